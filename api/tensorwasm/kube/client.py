"""The project's one Kubernetes client: async REST on aiohttp, with write accounting and watches.

Owns HTTP calls to the API server: get/list, watch streams, create, server-side apply, merge/JSON
patches, deletes, events. Every write is counted per verb and kind (`writes`) so tests and logs can
prove that a reconcile of an unchanged object writes nothing; 429 + Retry-After is honoured briefly.
The operator (beside kopf's own watching) and the runtime shard both use it; credentials come from
tensorwasm.kube.config. Must not import the operator, the runtime or kopf.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from tensorwasm.api.conditions import truncate_message
from tensorwasm.api.stamps import now_rfc3339
from tensorwasm.kube.config import Connection, load_connection

log = logging.getLogger("tensorwasm.kube")

# Writes made by the current asyncio task (one reconcile), when the caller set a counter.
task_writes: contextvars.ContextVar[Counter[str] | None] = contextvars.ContextVar("task_writes", default=None)

JSON = dict[str, Any]
Items = list[JSON]  # named: inside KubeApi, `list` is the method


THROTTLE_RETRY_S = 30.0  # how long one call keeps honouring 429 Retry-After before giving up


def _retry_after(header: str | None) -> float:
    """Seconds from a Retry-After header (delta-seconds form), clamped to [0.1, 5]."""
    try:
        return min(max(float(header or 1), 0.1), 5.0)
    except ValueError:
        return 1.0


class KubeError(Exception):
    """The API server answered an error status; `status` and `reason` come from its Status object."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


def resource_path(
    api_version: str, plural: str, namespace: str | None = None, name: str | None = None, sub: str = ""
) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


_PLURALS = {"Service": "services", "Secret": "secrets", "StatefulSet": "statefulsets", "Event": "events"}


def object_path(obj: Mapping[str, Any], sub: str = "") -> str:
    meta = obj["metadata"]
    plural = _PLURALS.get(obj["kind"]) or obj["kind"].lower() + "s"
    return resource_path(obj["apiVersion"], plural, meta.get("namespace"), meta["name"], sub)


TOKEN_REREAD_S = 60.0  # a rotated service-account token is picked up within this


class KubeApi:
    """One aiohttp session to one API server; counts the writes it makes."""

    def __init__(self, connection: Connection, field_manager: str) -> None:
        self.server = connection.server.rstrip("/")
        self.field_manager = field_manager
        self.writes: Counter[str] = Counter()
        self._connection = connection
        self._auth: tuple[float, dict[str, str]] = (time.monotonic(), connection.auth_headers())
        self._session = aiohttp.ClientSession(
            headers={"Accept": "application/json"},
            connector=aiohttp.TCPConnector(ssl=connection.ssl, limit=64),
            cookie_jar=aiohttp.DummyCookieJar(),  # the API server sets no cookies: skip the jar per request
            timeout=aiohttp.ClientTimeout(total=30),
        )

    def _headers(self) -> dict[str, str]:
        if self._connection.token_file is not None and time.monotonic() - self._auth[0] > TOKEN_REREAD_S:
            self._auth = (time.monotonic(), self._connection.auth_headers())
        return self._auth[1]

    async def close(self) -> None:
        await self._session.close()

    @property
    def total_writes(self) -> int:
        return sum(self.writes.values())

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        want_body: bool = True,
    ) -> JSON:
        data = None if body is None else json.dumps(body)
        headers = self._headers()
        if data is not None:
            headers = {**headers, "Content-Type": content_type}
        deadline = time.monotonic() + THROTTLE_RETRY_S
        while True:
            async with self._session.request(
                method, self.server + path, data=data, headers=headers, params=params
            ) as resp:
                if resp.status < 400 and not want_body:
                    await resp.read()  # read (undecoded) so the connection is reused
                    return {}
                payload = await resp.json(content_type=None) if resp.content_length != 0 else {}
                if resp.status < 400:
                    return payload if isinstance(payload, dict) else {}
                payload = payload if isinstance(payload, dict) else {}
                error = KubeError(
                    resp.status, str(payload.get("reason", "")), str(payload.get("message", ""))
                )
                # The API server sheds load (priority and fairness) or re-initialises a CRD's storage
                # with 429 + Retry-After: honour it briefly rather than fail the whole reconcile.
                delay = _retry_after(resp.headers.get("Retry-After"))
                if resp.status != 429 or time.monotonic() + delay > deadline:
                    raise error
            await asyncio.sleep(delay)

    def _count(self, verb: str, path: str, collection: bool = False) -> None:
        """Tally one write as "<verb> <plural>[/status]" (path names an object unless `collection`)."""
        parts = path.strip("/").split("/")
        if collection:
            what = parts[-1]
        elif parts[-1] == "status":
            what = parts[-3] + "/status"
        else:
            what = parts[-2]
        self.writes[f"{verb} {what}"] += 1
        mine = task_writes.get()
        if mine is not None:
            mine[f"{verb} {what}"] += 1

    # -- reads ---------------------------------------------------------------------------------
    async def get(self, path: str) -> JSON | None:
        try:
            return await self._call("GET", path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, path: str, label_selector: str | None = None) -> list[JSON]:
        params = {"labelSelector": label_selector} if label_selector else None
        items: list[JSON] = (await self._call("GET", path, params=params)).get("items") or []
        return items

    async def list_versioned(self, path: str, params: Mapping[str, str] | None = None) -> tuple[Items, str]:
        """The items and the list's resourceVersion (where a watch of the same path resumes)."""
        body = await self._call("GET", path, params=params)
        version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        return body.get("items") or [], version

    async def watch(
        self, path: str, version: str, timeout_s: int, params: Mapping[str, str] | None = None
    ) -> AsyncIterator[JSON]:
        """Watch events (type, object) from `version` on, until the server ends the stream."""
        query = {
            **(params or {}),
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        timeout = aiohttp.ClientTimeout(total=timeout_s + 30, sock_connect=10)
        async with self._session.get(
            self.server + path, params=query, headers=self._headers(), timeout=timeout
        ) as resp:
            if resp.status >= 400:
                payload = await resp.json(content_type=None)
                payload = payload if isinstance(payload, dict) else {}
                raise KubeError(resp.status, str(payload.get("reason", "")), str(payload.get("message", "")))
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)

    # -- writes --------------------------------------------------------------------------------
    async def create(self, path: str, obj: Mapping[str, Any], want_body: bool = True) -> JSON | None:
        """Create as our field manager; None when it already exists (409). `want_body=False`: the
        created object is not decoded ({} instead), for writes nobody reads back (Events)."""
        self._count("create", path, collection=True)
        try:
            params = {"fieldManager": self.field_manager}
            return await self._call("POST", path, obj, params=params, want_body=want_body)
        except KubeError as exc:
            if exc.status == 409:
                return None
            raise

    async def apply(self, obj: Mapping[str, Any]) -> JSON:
        """Server-side apply as our field manager; force takes fields over from stale managers."""
        path = object_path(obj)
        self._count("apply", path)
        params = {"fieldManager": self.field_manager, "force": "true"}
        return await self._call("PATCH", path, obj, "application/apply-patch+yaml", params)

    async def merge_patch(self, path: str, patch: Mapping[str, Any], want_body: bool = True) -> JSON:
        """`want_body=False` skips decoding the answer (a watch brings the new version anyway)."""
        self._count("patch", path)
        params = {"fieldManager": self.field_manager}
        return await self._call("PATCH", path, patch, "application/merge-patch+json", params, want_body)

    async def delete(self, path: str) -> None:
        """Delete (background propagation); an object already gone is fine."""
        self._count("delete", path)
        try:
            await self._call("DELETE", path)
        except KubeError as exc:
            if exc.status != 404:
                raise

    async def post_event(
        self, involved: Mapping[str, Any], type_: str, reason: str, message: str, component: str
    ) -> None:
        """A core/v1 Event about `involved` (best effort: an event lost is not worth a retry loop)."""
        meta = involved.get("metadata") or {}
        now = now_rfc3339()
        namespace = meta.get("namespace") or "default"
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'x')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": truncate_message(message),
            "source": {"component": component},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": component,
        }
        try:
            await self.create(resource_path("v1", "events", namespace), event, want_body=False)
        except (KubeError, aiohttp.ClientError) as exc:
            log.warning("Failed to post Event reason=%s for %s: %s", reason, meta.get("name"), exc)


async def connect(field_manager: str, kubeconfig: Path | None = None) -> KubeApi:
    """`kubeconfig` when given, else in-cluster first, else $KUBECONFIG / ~/.kube/config."""
    return KubeApi(load_connection(kubeconfig), field_manager)
