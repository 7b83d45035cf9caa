"""A small async Kubernetes REST client on aiohttp, with write accounting.

Owns HTTP calls to the API server: get/list, create, server-side apply, merge/JSON patches,
events. Every write is counted per verb and kind (`writes`) so tests and logs can prove that a
reconcile of an unchanged object writes nothing. Credentials come from kopf's own login
helpers (in-cluster service account, else kubeconfig) so the watch and the writes agree.
Must not import handlers/, placement or desired/.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import datetime
import json
import logging
import os
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import kopf

from tensorwasm.operator.settings import FIELD_MANAGER

log = logging.getLogger("tensorwasm.operator.kube")

# Writes made by the current asyncio task (one reconcile), when the caller set a counter.
task_writes: contextvars.ContextVar[Counter[str] | None] = contextvars.ContextVar("task_writes", default=None)

JSON = dict[str, Any]


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


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    ctx = ssl.create_default_context()
    if info.ca_path:
        ctx.load_verify_locations(cafile=os.fsdecode(info.ca_path))
    elif info.ca_data:
        data = info.ca_data.encode() if isinstance(info.ca_data, str) else info.ca_data
        ctx.load_verify_locations(cadata=base64.b64decode(data).decode())
    cert, key = info.certificate_path, info.private_key_path
    tmp: list[str] = []
    try:
        if info.certificate_data and info.private_key_data:
            for blob in (info.certificate_data, info.private_key_data):
                raw = blob.encode() if isinstance(blob, str) else blob
                fd, path = tempfile.mkstemp(prefix="tw-kube-")
                with os.fdopen(fd, "wb") as f:
                    f.write(base64.b64decode(raw))
                tmp.append(path)
            cert, key = tmp
        if cert and key:
            ctx.load_cert_chain(os.fsdecode(cert), os.fsdecode(key))
    finally:
        for path in tmp:
            os.unlink(path)
    return ctx


class KubeApi:
    """One aiohttp session to one API server; counts the writes it makes."""

    def __init__(self, info: kopf.ConnectionInfo, field_manager: str = FIELD_MANAGER) -> None:
        self.server = info.server.rstrip("/")
        self.field_manager = field_manager
        self.writes: Counter[str] = Counter()
        headers = {"Accept": "application/json", **info.as_http_headers()}
        self._session = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(ssl=_ssl_context(info), limit=64),
            cookie_jar=aiohttp.DummyCookieJar(),  # the API server sets no cookies: skip the jar per request
            timeout=aiohttp.ClientTimeout(total=30),
        )

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
    ) -> JSON:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        deadline = time.monotonic() + THROTTLE_RETRY_S
        while True:
            async with self._session.request(
                method, self.server + path, data=data, headers=headers, params=params
            ) as resp:
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

    # -- writes --------------------------------------------------------------------------------
    async def create(self, path: str, obj: Mapping[str, Any]) -> JSON | None:
        """Create as our field manager; None when it already exists (409)."""
        self._count("create", path, collection=True)
        try:
            return await self._call("POST", path, obj, params={"fieldManager": self.field_manager})
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

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> JSON:
        self._count("patch", path)
        params = {"fieldManager": self.field_manager}
        return await self._call("PATCH", path, patch, "application/merge-patch+json", params)

    async def json_patch(self, path: str, ops: Sequence[Mapping[str, Any]]) -> JSON:
        self._count("patch", path)
        params = {"fieldManager": self.field_manager}
        return await self._call("PATCH", path, list(ops), "application/json-patch+json", params)

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
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
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
            "message": message[:1024],
            "source": {"component": component},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": component,
        }
        try:
            await self.create(resource_path("v1", "events", namespace), event)
        except (KubeError, aiohttp.ClientError) as exc:
            log.warning("Failed to post Event reason=%s for %s: %s", reason, meta.get("name"), exc)


async def connect(field_manager: str = FIELD_MANAGER) -> KubeApi:
    """Credentials the way kopf finds them: in-cluster first, else $KUBECONFIG / ~/.kube/config."""
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig ($KUBECONFIG) found")
    return KubeApi(info, field_manager)
