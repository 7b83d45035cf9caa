"""Starting and stopping the aiohttp server of a shard on a socket we bind ourselves.

Owns `serve`: binding first lets callers ask for port 0 and learn the real port (tests, benchmarks,
the `Runtime listening` log line). Access logging is off: the invoke path is counted in metrics,
and a log line per request would cost more than the invoke itself.
Must not import wasmtime or cuda.
"""

from __future__ import annotations

import socket

from aiohttp import web


async def serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving `app` on host:port; returns the runner (call `cleanup()`) and the bound port."""
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
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=1024).start()
    return runner, bound
