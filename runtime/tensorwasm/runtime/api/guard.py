"""Connection-level limits of the shard's HTTP listeners: how many, from whom, and how slow.

Owns `ConnectionGuard`: it wraps aiohttp's protocol factory so that every TCP connection is
counted (a global cap and a per-source-address cap, refused at accept time by closing), and a
sweep once a second closes connections that are between requests for longer than the header
timeout (a client that opens a connection and sends its headers byte by byte, or nothing, holds an
fd for seconds, not for ever). The request handlers bound the body read themselves (app.py).
The hot path pays nothing per request: the sweep reads how many requests each connection's aiohttp
handler has parsed and whether one is in progress (aiohttp private state, read in `_activity` only;
where an aiohttp lacks it, a middleware marks each request instead, as before).
Must not import wasmtime or cuda.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    """Defaults are documented in docs/runtime.md ("HTTP limits")."""

    header_timeout_s: float = 10.0  # connect or last response -> the next request's headers complete
    body_timeout_s: float = 30.0  # headers complete -> the whole body read
    max_connections: int = 10_000
    max_connections_per_source: int = 512


# aiohttp's RequestHandler counts the requests whose headers it parsed and flags the one it is
# handling (aiohttp 3.10-3.14 at least); tests/unit/test_runtime_http_hardening.py fails if renamed.
_HANDLER_STATE = ("_request_count", "_request_in_progress")


def _activity(handler: Any) -> tuple[int, bool]:
    """(requests parsed so far, one being handled now) of an aiohttp RequestHandler."""
    return handler._request_count, handler._request_in_progress  # type: ignore[no-any-return]


def reads_handler_state() -> bool:
    """Whether the installed aiohttp keeps the state the sweep reads (else the middleware is used)."""
    slots = getattr(RequestHandler, "__slots__", ())
    return all(name in slots for name in _HANDLER_STATE)


class _Guarded(asyncio.Protocol):
    """Forwards everything to aiohttp's RequestHandler; remembers when it was last seen active."""

    __slots__ = ("busy", "guard", "inner", "peer", "seen", "since", "transport")

    def __init__(self, guard: ConnectionGuard, inner: Any) -> None:
        self.guard, self.inner = guard, inner
        self.busy = False  # middleware mode only
        self.seen = 0  # requests parsed when the sweep last looked
        self.since = 0.0  # last seen active (connect, or a request parsed or in progress)
        self.peer = ""
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        self.since = self.guard.loop.time()
        self.inner.connection_made(transport)
        if not self.guard.admit(self):
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self.inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ConnectionGuard:
    """One per listener. `protocol_factory` goes to `loop.create_server`; `middleware` on the app
    when `needs_middleware` (an aiohttp without the handler state the sweep reads)."""

    def __init__(
        self, limits: ConnectionLimits, loop: asyncio.AbstractEventLoop, needs_middleware: bool | None = None
    ) -> None:
        self.limits = limits
        self.loop = loop
        self.needs_middleware = not reads_handler_state() if needs_middleware is None else needs_middleware
        self._open: dict[asyncio.BaseTransport, _Guarded] = {}
        self._per_source: dict[str, int] = {}
        self.refused = 0  # connections closed at accept time (caps)
        self.timed_out = 0  # connections closed by the header timeout
        self._sweeper: asyncio.Task[None] | None = None

    def protocol_factory(self, make_handler: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        def factory() -> asyncio.Protocol:
            return _Guarded(self, make_handler())

        return factory

    def admit(self, conn: _Guarded) -> bool:
        n = self._per_source.get(conn.peer, 0)
        if len(self._open) >= self.limits.max_connections or n >= self.limits.max_connections_per_source:
            self.refused += 1
            return False
        assert conn.transport is not None
        self._open[conn.transport] = conn
        self._per_source[conn.peer] = n + 1
        return True

    def forget(self, conn: _Guarded) -> None:
        if conn.transport is not None and self._open.pop(conn.transport, None) is not None:
            left = self._per_source.get(conn.peer, 1) - 1
            if left:
                self._per_source[conn.peer] = left
            else:
                self._per_source.pop(conn.peer, None)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def start(self) -> None:
        self._sweeper = self.loop.create_task(self._sweep())

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def _sweep(self) -> None:
        timeout = self.limits.header_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 2))
            stale = self._stale(self.loop.time(), timeout)
            for conn in stale:
                self.timed_out += 1
                if conn.transport is not None:
                    conn.transport.close()
            if stale:
                log.info("Closed idle or slow HTTP connections count=%d", len(stale))

    def _stale(self, now: float, timeout: float) -> list[_Guarded]:
        """Connections idle (no request parsed or in progress) for longer than `timeout`. A request
        parsed since the last sweep counts as activity now: a connection is never closed early."""
        cutoff = now - timeout
        stale = []
        for c in self._open.values():
            if not self.needs_middleware:
                count, busy = _activity(c.inner)
                if busy or c.busy or count != c.seen:  # busy now, or active since the last look
                    c.seen, c.busy, c.since = count, busy, now
                    continue
            elif c.busy:  # the middleware stamps `since` when the request ends
                continue
            # Still writing a response to a slow reader is not idle (its size is capped elsewhere).
            if c.since < cutoff and not _writing(c.transport):
                stale.append(c)
        return stale

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        conn = self._open.get(request.transport) if request.transport is not None else None
        if conn is None:
            return await handler(request)
        conn.busy = True
        try:
            return await handler(request)
        finally:
            conn.busy = False
            conn.since = self.loop.time()


def _writing(transport: asyncio.BaseTransport | None) -> bool:
    size = getattr(transport, "get_write_buffer_size", None)
    return bool(size is not None and size())
