"""Starting and stopping an aiohttp server of a shard on a socket we bind ourselves.

Owns `serve`: binding first lets callers ask for port 0 and learn the real port (tests, benchmarks,
the `Runtime listening` log line). Every connection goes through a `ConnectionGuard` (connection
caps, header timeout); aiohttp's own limits bound header sizes, and an unread request body closes
the connection instead of being read and dropped. Access logging is off: the invoke path is
counted in metrics, and a log line per request would cost more than the invoke itself.
Must not import wasmtime or cuda.
"""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web

from tensorwasm.runtime.api.guard import ConnectionGuard, ConnectionLimits


class Listener:
    """A running server: `cleanup()` stops accepting, closes connections and the app."""

    def __init__(self, runner: web.AppRunner, server: asyncio.AbstractServer, guard: ConnectionGuard) -> None:
        self.runner, self.server, self.guard = runner, server, guard

    async def cleanup(self) -> None:
        self.guard.stop()
        self.server.close()
        await self.runner.cleanup()


async def serve(
    app: web.Application, host: str, port: int, limits: ConnectionLimits | None = None
) -> tuple[Listener, int]:
    """Start serving `app` (not yet started) on host:port; returns the listener (call `cleanup()`)
    and the bound port."""
    limits = limits or ConnectionLimits()
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    bound = int(sock.getsockname()[1])
    guard = ConnectionGuard(limits, loop)
    if guard.needs_middleware:  # an aiohttp whose handler state the sweep cannot read
        app.middlewares.insert(0, guard.middleware)  # the app is frozen by setup() below
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=2.0,
        keepalive_timeout=limits.header_timeout_s,
        lingering_time=0,  # an unread body closes the connection: it is never read to be dropped
    )
    await runner.setup()
    assert runner.server is not None
    server = await loop.create_server(guard.protocol_factory(runner.server), sock=sock, backlog=1024)
    guard.start()
    return Listener(runner, server, guard), bound
