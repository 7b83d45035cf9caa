"""HTTP edges under attack (issue 13): admission before the body is read (413/429 with the body
never read), a global in-flight body budget, header and body read timeouts, connection caps per
source, a per-source limit on failed authentication, and /metrics + /readyz detail only on the
admin listener. Real shard, real aiohttp server, raw sockets as the hostile client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from tensorwasm.runtime.api import guard as guard_module
from tensorwasm.runtime.api.admission import AdmissionLimits
from tensorwasm.runtime.api.app import build_admin_app, build_app
from tensorwasm.runtime.api.guard import ConnectionGuard, ConnectionLimits, _Guarded, reads_handler_state
from tensorwasm.runtime.api.server import serve
from tensorwasm.runtime.engine import Engine
from tensorwasm.runtime.modules import ModuleLoader
from tensorwasm.runtime.shard import Shard
from tests.runtime_fixtures import tenant

ALPHA = tenant("alpha", "echo.wat", ["echo"], max_body_bytes=1024, max_concurrency=1, queue_length=0)
TOKEN = ALPHA.token


@asynccontextmanager
async def shard_server(
    admission: AdmissionLimits | None = None, connections: ConnectionLimits | None = None
) -> AsyncIterator[tuple[int, int, Shard]]:
    engine = Engine()
    shard = Shard(engine, None, ModuleLoader(engine, 1 << 20, 5.0))
    await shard.sync([ALPHA])
    app = build_app(shard, admission=admission, connections=connections)
    tenant_listener, port = await serve(app, "127.0.0.1", 0, connections)
    admin_listener, admin_port = await serve(build_admin_app(shard), "127.0.0.1", 0)
    try:
        yield port, admin_port, shard
    finally:
        await tenant_listener.cleanup()
        await admin_listener.cleanup()
        await shard.close()
        engine.close()


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 120))


async def send(port: int, head: str, body: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


def invoke_head(length: int, token: str = TOKEN) -> str:
    return (
        f"POST /v1/functions/echo/invoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status_line = await reader.readline()
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode().partition(":")
        headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    """Wait for server state (not for time), with a generous deadline for a busy machine."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def kind(body: bytes) -> Any:
    return json.loads(body)["error"]["kind"]


def test_an_oversize_body_is_refused_before_a_byte_of_it_is_read() -> None:
    async def main() -> None:
        async with shard_server() as (port, _, _):
            reader, writer = await send(port, invoke_head(50 << 20))  # 50 MiB announced, none sent
            status, headers, body = await response(reader)
            assert status == 413 and kind(body) == "payload_too_large"
            assert headers.get("connection", "").lower() == "close"
            assert await reader.read() == b""  # closed: the body is never read
            writer.close()

    run(main)


def test_a_full_queue_refuses_before_the_body_is_read() -> None:
    async def main() -> None:
        async with shard_server() as (port, _, shard):
            # The tenant's one slot is taken by a request whose body has not arrived yet.
            holder, holder_w = await send(port, invoke_head(100), b"x" * 10)
            queue = shard.served["alpha"].queue
            await until(lambda: queue.outstanding >= 1, "the holder admitted")
            reader, writer = await send(port, invoke_head(1000))
            status, headers, body = await response(reader)
            assert status == 429 and kind(body) == "queue_full" and "retry-after" in headers
            assert await reader.read() == b""
            holder_w.write(b"y" * 90)  # the first one completes normally
            status, _, body = await response(holder)
            assert status == 200 and body == b"x" * 10 + b"y" * 90
            assert queue.outstanding == 0
            for w in (writer, holder_w):
                w.close()

    run(main)


def test_the_global_in_flight_body_budget_refuses_with_429() -> None:
    async def main() -> None:
        budget = AdmissionLimits(inflight_body_bytes=1500)
        async with shard_server(admission=budget) as (port, _, shard):
            other = tenant("beta", "echo.wat", ["echo"], max_body_bytes=1024, max_concurrency=4)
            await shard.sync([ALPHA, other])
            holder, holder_w = await send(port, invoke_head(1000), b"z")  # 1,000 bytes admitted
            await until(lambda: shard.served["alpha"].queue.outstanding >= 1, "the holder admitted")
            reader, writer = await send(port, invoke_head(1000, other.token))  # 2,000 > 1,500
            status, headers, body = await response(reader)
            assert status == 429 and kind(body) == "overloaded" and headers["retry-after"] == "1"
            holder_w.write(b"z" * 999)
            assert (await response(holder))[0] == 200
            reader2, writer2 = await send(port, invoke_head(1000, other.token), b"b" * 1000)
            assert (await response(reader2))[0] == 200  # the budget came back
            for w in (writer, writer2, holder_w):
                w.close()

    run(main)


def test_slow_headers_and_slow_bodies_are_cut_off() -> None:
    async def main() -> None:
        limits = ConnectionLimits(header_timeout_s=0.5, body_timeout_s=0.5)
        async with shard_server(connections=limits) as (port, _, _):
            # Half the headers, then nothing: the connection is closed, no response owed.
            reader, writer = await send(port, "POST /v1/functions/echo/invoke HTTP/1.1\r\nHost: x\r\n")
            assert await asyncio.wait_for(reader.read(), 30) == b""
            writer.close()
            # Nothing at all after connecting: closed too.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 30) == b""
            writer.close()
            # Headers complete, body trickles: 408 once the body timeout passes.
            reader, writer = await send(port, invoke_head(100), b"x")
            status, _, body = await asyncio.wait_for(response(reader), 30)
            assert status == 408 and kind(body) == "request_timeout"
            writer.close()

    run(main)


def test_connections_per_source_are_capped() -> None:
    async def main() -> None:
        limits = ConnectionLimits(max_connections_per_source=2)
        async with shard_server(connections=limits) as (port, _, _):
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 30) == b""  # closed at accept
            writer.close()
            r, w = held[0]
            w.write(invoke_head(2).encode() + b"ok")
            assert (await response(r))[2] == b"ok"  # the admitted ones serve normally
            for _, w in held:
                w.close()

    run(main)


def test_failed_authentication_is_rate_limited_per_source() -> None:
    async def main() -> None:
        limits = AdmissionLimits(auth_failures_per_s=0.01, auth_failure_burst=3)
        async with shard_server(admission=limits) as (port, _, _):
            for _ in range(3):
                reader, writer = await send(port, invoke_head(0, "wrong-token-0000"))
                assert (await response(reader))[0] == 401
                writer.close()
            reader, writer = await send(port, invoke_head(0, "wrong-token-0000"))
            status, headers, body = await response(reader)
            assert status == 429 and kind(body) == "overloaded" and int(headers["retry-after"]) >= 1
            writer.close()
            # The right token from the same address is never held back.
            reader, writer = await send(port, invoke_head(2), b"hi")
            assert (await response(reader))[2] == b"hi"
            writer.close()

    run(main)


def test_metrics_and_readiness_detail_live_on_the_admin_port_only() -> None:
    async def main() -> None:
        async with shard_server() as (port, admin_port, _):
            get = "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            reader, writer = await send(port, get.format("/metrics"))
            assert (await response(reader))[0] == 404
            writer.close()
            reader, writer = await send(port, get.format("/readyz"))
            status, _, body = await response(reader)
            assert status == 200 and json.loads(body) == {"ready": True}  # no tenant names
            writer.close()
            reader, writer = await send(admin_port, get.format("/readyz"))
            status, _, body = await response(reader)
            assert status == 200 and json.loads(body)["loaded"] == ["alpha"]
            writer.close()
            reader, writer = await send(admin_port, get.format("/metrics"))
            status, _, body = await response(reader)
            assert status == 200 and b"tensorwasm_tenant_loaded" in body
            writer.close()

    run(main)


def test_a_request_running_longer_than_the_header_timeout_is_not_cut_off() -> None:
    async def main() -> None:
        limits = ConnectionLimits(header_timeout_s=0.3)  # swept every 0.15 s
        async with shard_server(connections=limits) as (port, _, shard):
            spin = tenant("spinner", "runaway.wat", ["spin"], timeout_ms=1500)
            await shard.sync([ALPHA, spin])
            head = invoke_head(0, spin.token).replace("/echo/", "/spin/")
            reader, writer = await send(port, head)
            # In progress for 1.5 s, five header timeouts: answered by its deadline, not closed.
            status, _, body = await asyncio.wait_for(response(reader), 60)
            assert status == 504 and kind(body) == "deadline_exceeded"
            writer.close()

    run(main)


def test_the_middleware_fallback_keeps_both_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    # An aiohttp without the handler state the sweep reads: each request is marked by a middleware.
    monkeypatch.setattr(guard_module, "reads_handler_state", lambda: False)

    async def main() -> None:
        limits = ConnectionLimits(header_timeout_s=0.3)
        async with shard_server(connections=limits) as (port, _, shard):
            spin = tenant("spinner", "runaway.wat", ["spin"], timeout_ms=1500)
            await shard.sync([ALPHA, spin])
            reader, writer = await send(port, invoke_head(0, spin.token).replace("/echo/", "/spin/"))
            status, _, body = await asyncio.wait_for(response(reader), 60)
            assert status == 504 and kind(body) == "deadline_exceeded"  # in progress: not cut off
            assert await asyncio.wait_for(reader.read(), 30) == b""  # then idle: closed
            writer.close()

    run(main)


def test_small_bodies_taken_with_the_headers_and_chunked_ones_read_alike() -> None:
    async def main() -> None:
        async with shard_server() as (port, _, _):
            reader, writer = await send(port, invoke_head(0))  # empty body, Content-Length: 0
            assert (await response(reader))[:1] == (200,)
            writer.write(invoke_head(5).encode() + b"hello")  # same connection, body in the packet
            assert (await response(reader))[2] == b"hello"
            chunked = invoke_head(0).replace("Content-Length: 0", "Transfer-Encoding: chunked")
            writer.write(chunked.encode() + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            assert (await response(reader))[2] == b"abcde"
            writer.close()

    run(main)


class _Handler:
    """The two fields of aiohttp's RequestHandler that the sweep reads."""

    def __init__(self) -> None:
        self._request_count = 0
        self._request_in_progress = False


class _Transport:
    def get_write_buffer_size(self) -> int:
        return 0


def test_the_installed_aiohttp_keeps_the_handler_state_the_sweep_reads() -> None:
    # Fails loudly on an aiohttp that renamed them (the guard would fall back to a middleware).
    assert reads_handler_state()


def test_the_sweep_closes_only_connections_idle_for_the_whole_timeout() -> None:
    loop = asyncio.new_event_loop()
    try:
        for middleware in (False, True):
            guard = ConnectionGuard(ConnectionLimits(header_timeout_s=10), loop, needs_middleware=middleware)
            conn = _Guarded(guard, _Handler())
            conn.transport = _Transport()  # type: ignore[assignment]
            guard._open[conn.transport] = conn  # type: ignore[index]  # as admit() does
            assert guard._stale(9.0, 10) == []  # connected at 0, nothing parsed yet
            assert guard._stale(10.5, 10) == [conn]  # nothing for 10 s: a slow or silent client
            # A request in progress for 20 s is never idle.
            if middleware:
                conn.busy = True
            else:
                conn.inner._request_count, conn.inner._request_in_progress = 1, True
            assert guard._stale(30.0, 10) == []
            # It ends at 31: the middleware stamps that; the sweep sees it ended by 32.
            if middleware:
                conn.busy, conn.since = False, 31.0
            else:
                conn.inner._request_in_progress = False
            assert guard._stale(32.0, 10) == []
            assert guard._stale(41.9, 10) == ([conn] if middleware else [])  # never early
            assert guard._stale(42.1, 10) == [conn]
    finally:
        loop.close()
