"""A small in-memory Kubernetes API server for in-process tests of the operator and the shard source.

Serves the few endpoints tensorwasm.kube.client uses, over real HTTP on loopback (aiohttp): list
(label and simple field selectors), watch streams from a resourceVersion, get, create (409 on a
name taken, generateName), merge patch and server-side apply (as a merge: enough for the fields
we set), the status subresource, delete with finalizers (deletionTimestamp, then gone when the
last finalizer goes). Every object gets uid, resourceVersion, generation (bumped by spec changes)
and creationTimestamp. `fail()` makes the next calls on a path answer an error; `wait_for()`
waits on observable state, never on time. Not a validator: the real API server's schema and CEL
are tested in tests/cluster. `running_shard()` runs a real shard (engine, CPU backend, KubeSource,
optionally its HTTP app) against a FakeKube, for the in-process tests of the shard's side.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from aiohttp import web

from tensorwasm.kube.client import KubeApi
from tensorwasm.kube.config import Connection

if TYPE_CHECKING:
    from tensorwasm.runtime.settings import RuntimeSettings
    from tensorwasm.runtime.shard import Shard
    from tensorwasm.runtime.sources.kube import KubeSource

JSON = dict[str, Any]
STAMP = "2026-11-29T12:00:00Z"


def merge(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(base) if isinstance(base, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


def _field(obj: Mapping[str, Any], dotted: str) -> str:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return "" if value is None else str(value)


def matches(obj: Mapping[str, Any], labels: str, fields: str) -> bool:
    have = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, labels.split(",")):
        key, _, want = term.partition("=")
        if key not in have or (want and have[key] != want):
            return False
    for term in filter(None, fields.split(",")):
        if "!=" in term:
            key, want = term.split("!=", 1)
            if _field(obj, key) == want:
                return False
        else:
            key, _, want = term.partition("=")
            if _field(obj, key) != want:
                return False
    return True


@dataclass
class Event:
    version: int
    collection: str
    type: str
    obj: JSON


@dataclass
class FakeKube:
    objects: dict[tuple[str, str], JSON] = field(default_factory=dict)  # (collection, name) -> object
    events: list[Event] = field(default_factory=list)
    writes: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every write
    failures: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    version: int = 100
    uids: itertools.count[int] = field(default_factory=itertools.count)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    url: str = ""
    oldest: int = 0  # watches from an older resourceVersion get 410 Gone (etcd compacted it)
    drops: int = 0  # bumped by drop_watches(): every open watch stream ends
    stopping: bool = False  # set by stop(): every watch stream ends
    _runner: web.AppRunner | None = None

    # --- test-side API -----------------------------------------------------------------------
    async def start(self) -> FakeKube:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        # Every watch stream ends now: one between two waits would otherwise sit until its
        # timeoutSeconds, and the runner's cleanup waits on it (aiohttp's 60 s shutdown timeout).
        self.stopping = True
        async with self.changed:
            self.changed.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()

    def client(self, field_manager: str) -> KubeApi:
        return KubeApi(Connection(self.url, ssl=False), field_manager)

    def get(self, collection: str, name: str) -> JSON | None:
        return self.objects.get((collection, name))

    def items(self, collection: str) -> list[JSON]:
        return [o for (c, _), o in self.objects.items() if c == collection]

    def fail(self, method: str, path: str, *statuses: int) -> None:
        """The next len(statuses) `method` calls on exactly `path` answer these error statuses."""
        self.failures.setdefault((method, path), []).extend(statuses)

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Until `predicate()` is truthy after some change; the timeout only guards a broken test.
        asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that lands
        as the condition fires (the waiter then runs on past its test's end)."""
        async with asyncio.timeout(timeout), self.changed:
            return await self.changed.wait_for(predicate)

    async def put(self, collection: str, obj: JSON) -> JSON:
        """Create or replace as a user would (kubectl apply), through the same code as the API."""
        name = obj["metadata"]["name"]
        if (collection, name) in self.objects:
            return await self._patch(collection, name, obj, status=False, owner="test")
        return await self._create(collection, obj)

    async def put_status(self, collection: str, name: str, status: JSON) -> JSON:
        """A merge patch of the status subresource, as the operator or a shard would send it."""
        return await self._patch(collection, name, {"status": status}, status=True, owner="test")

    async def compact_and_drop_watches(self) -> None:
        """What a long-lived cluster does to a client: history compacted, connections cut."""
        self.oldest, self.drops = self.version, self.drops + 1
        async with self.changed:
            self.changed.notify_all()

    async def remove(self, collection: str, name: str) -> None:
        await self._delete(collection, name)

    # --- the API ------------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        queued = self.failures.get((request.method, path))
        if queued:
            status = queued.pop(0)
            return self._status(status, "Injected")
        collection, name, sub = self._split(path)
        q = request.query
        if request.method == "GET" and name is None and q.get("watch") == "true":
            return await self._watch(request, collection)
        if request.method == "GET":
            if name is None:
                items = [o for o in self.items(collection)
                         if matches(o, q.get("labelSelector", ""), q.get("fieldSelector", ""))]  # fmt: skip
                body = {"kind": "List", "metadata": {"resourceVersion": str(self.version)}, "items": items}
                return web.json_response(body)
            obj = self.get(collection, name)
            return web.json_response(obj) if obj else self._status(404, "NotFound")
        self.writes.append((request.method, path))
        if request.method == "DELETE":
            if (collection, name or "") not in self.objects:
                return self._status(404, "NotFound")
            await self._delete(collection, name or "")
            return web.json_response({"kind": "Status", "status": "Success"})
        payload = json.loads(await request.read() or b"null")
        if request.method == "POST":
            meta = payload.setdefault("metadata", {})
            if meta.get("generateName") and not meta.get("name"):
                meta["name"] = f"{meta['generateName']}{next(self.uids)}"
            if (collection, meta["name"]) in self.objects:
                return self._status(409, "AlreadyExists")
            return web.json_response(await self._create(collection, payload), status=201)
        assert request.method == "PATCH" and name is not None
        apply = request.content_type == "application/apply-patch+yaml"
        if (collection, name) not in self.objects:
            if not apply:
                return self._status(404, "NotFound")
            return web.json_response(await self._create(collection, payload))
        wanted = (payload.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != self.objects[(collection, name)]["metadata"]["resourceVersion"]:
            return self._status(409, "Conflict")
        owner = q.get("fieldManager", "")
        return web.json_response(
            await self._patch(collection, name, payload, status=sub == "status", owner=owner)
        )

    @staticmethod
    def _split(path: str) -> tuple[str, str | None, str]:
        parts = path.strip("/").split("/")
        base = 2 if parts[0] == "api" else 3  # /api/v1 | /apis/<group>/<version>
        rest = parts[base:] or ["(discovery)"]  # /apis/<group>/<version> itself: served by no CRD here
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            prefix, rest = parts[: base + 2], rest[2:]
        else:
            prefix = parts[:base]
        collection = "/" + "/".join([*prefix, rest[0]])
        return collection, (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else "")

    @staticmethod
    def _status(code: int, reason: str) -> web.Response:
        return web.json_response(
            {"kind": "Status", "code": code, "reason": reason, "message": reason}, status=code
        )

    async def _record(self, collection: str, type_: str, obj: JSON) -> JSON:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        if type_ == "DELETED":
            self.objects.pop((collection, obj["metadata"]["name"]), None)
        else:
            self.objects[(collection, obj["metadata"]["name"])] = obj
        self.events.append(Event(self.version, collection, type_, copy.deepcopy(obj)))
        async with self.changed:
            self.changed.notify_all()
        return copy.deepcopy(obj)

    async def _create(self, collection: str, payload: JSON) -> JSON:
        obj = copy.deepcopy(payload)
        meta = obj.setdefault("metadata", {})
        parts = collection.strip("/").split("/")
        if "namespaces" in parts:
            meta.setdefault("namespace", parts[parts.index("namespaces") + 1])
        meta.update(
            uid=f"uid-{next(self.uids)}",
            generation=1,
            creationTimestamp=meta.get("creationTimestamp") or STAMP,
        )
        if "stringData" in obj:  # the API server folds stringData into data
            strings = obj.pop("stringData")
            obj.setdefault("data", {}).update(
                {k: base64.b64encode(v.encode()).decode() for k, v in strings.items()}
            )
        return await self._record(collection, "ADDED", obj)

    async def _patch(self, collection: str, name: str, payload: JSON, status: bool, owner: str) -> JSON:
        old = self.objects[(collection, name)]
        if status:  # the status subresource changes status only
            new = {**copy.deepcopy(old), "status": merge(old.get("status"), payload.get("status"))}
        else:
            body = {k: v for k, v in payload.items() if k != "status"}
            body["metadata"] = {
                k: v for k, v in (body.get("metadata") or {}).items() if k != "resourceVersion"
            }
            new = merge(old, body)
            if new.get("spec") != old.get("spec"):
                new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return await self._record(collection, "DELETED", new)
        return await self._record(collection, "MODIFIED", new)

    async def _delete(self, collection: str, name: str) -> None:
        obj = copy.deepcopy(self.objects[(collection, name)])
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = STAMP
                await self._record(collection, "MODIFIED", obj)
            return
        await self._record(collection, "DELETED", obj)

    async def _watch(self, request: web.Request, collection: str) -> web.StreamResponse:
        q = request.query
        since = int(q.get("resourceVersion") or 0)
        labels, fields = q.get("labelSelector", ""), q.get("fieldSelector", "")
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        if since < self.oldest:
            gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
            await resp.write(json.dumps(gone).encode() + b"\n")
            return resp
        drops = self.drops
        deadline = asyncio.get_running_loop().time() + float(q.get("timeoutSeconds", "300"))
        seen: dict[str, bool] = {}  # name -> matched at its last event: leaving the selection is a DELETED
        for event in self.events:
            if event.version <= since and event.collection == collection:
                name = event.obj["metadata"]["name"]
                seen[name] = event.type != "DELETED" and matches(event.obj, labels, fields)
        while not self.stopping:
            checked = self.version
            fresh = [e for e in self.events if e.version > since and e.collection == collection]
            for event in fresh:
                since = event.version
                name = event.obj["metadata"]["name"]
                hit = matches(event.obj, labels, fields)
                kind = event.type if hit else ("DELETED" if seen.get(name) else None)
                seen[name] = hit and event.type != "DELETED"
                if kind is not None:
                    try:
                        await resp.write(json.dumps({"type": kind, "object": event.obj}).encode() + b"\n")
                    except ConnectionResetError:
                        return resp
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining), self.changed:
                    # Wait only if nothing happened while the events were written: a notify that
                    # came then found no waiter, and its event would sit until the next change.
                    if not self.stopping and self.drops == drops and self.version == checked:
                        await self.changed.wait()
            except TimeoutError:
                break
            if request.transport is None or request.transport.is_closing() or self.drops != drops:
                break
        with contextlib.suppress(ConnectionResetError):  # the client went away first
            await resp.write_eof()
        return resp


async def until(predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll client-side state (an informer's cache, a shard's served set): it changes after the fake's
    own notification, so FakeKube.wait_for cannot see it. The timeout only guards a broken test."""
    async with asyncio.timeout(timeout):
        while not (result := predicate()):
            await asyncio.sleep(0.01)
    return result


def with_fake_kube(body: Callable[[FakeKube], Awaitable[None]]) -> None:
    """Run `body` on a fresh event loop against a started FakeKube, stopped afterwards."""

    async def main() -> None:
        fake = await FakeKube().start()
        try:
            await body(fake)
        finally:
            await fake.stop()

    asyncio.run(main())


class RunningShard(NamedTuple):
    shard: Shard
    source: KubeSource
    url: str  # the shard's HTTP app, "http://127.0.0.1:<port>"; "" unless served


STOP_S = 30.0  # a source cancelled at teardown must stop within this; only a broken one takes it


@asynccontextmanager
async def running_shard(
    fake: FakeKube, settings: RuntimeSettings, serve_http: bool = False, **shard_options: Any
) -> AsyncIterator[RunningShard]:
    """A real Shard (engine, CPU backend) fed by the real KubeSource from `fake`, its HTTP app on an
    ephemeral port with `serve_http`; all of it stopped and closed on the way out."""
    from tensorwasm.runtime.accel import select_accelerator
    from tensorwasm.runtime.api.app import build_app
    from tensorwasm.runtime.api.server import serve
    from tensorwasm.runtime.engine import Engine
    from tensorwasm.runtime.modules import ModuleLoader
    from tensorwasm.runtime.shard import Shard
    from tensorwasm.runtime.sources.kube import KubeSource

    engine, accelerator = Engine(epoch_tick_s=0.001), select_accelerator("cpu")
    shard = Shard(engine, accelerator, ModuleLoader(engine, 64 << 20, 10.0), **shard_options)
    source = KubeSource(settings)
    api = fake.client("tensorwasm-shard")
    task = asyncio.create_task(source.run(shard, api))
    runner, url = None, ""
    try:
        if serve_http:
            runner, port = await serve(build_app(shard), "127.0.0.1", 0)
            url = f"http://127.0.0.1:{port}"
        yield RunningShard(shard, source, url)
    finally:
        if runner is not None:
            await runner.cleanup()
        task.cancel()
        # Bounded, and not pytest.raises(CancelledError): a source that swallows its cancellation
        # fails here with this message instead of hanging the suite.
        await asyncio.wait([task], timeout=STOP_S)
        assert task.done(), f"the shard's KubeSource did not stop within {STOP_S:g} s of its cancellation"
        if not task.cancelled():
            task.result()  # it ended on its own: its error is the test's
            raise AssertionError("the shard's KubeSource returned although it serves until cancelled")
        await api.close()
        await shard.close()
        engine.close()
        accelerator.close()
