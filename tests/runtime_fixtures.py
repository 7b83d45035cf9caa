"""The `runtime_server` fixture: a real runtime shard (engine, CPU accelerator, aiohttp) on an ephemeral port.

The server runs on its own event loop in a background thread, exactly as `python -m tensorwasm.runtime`
wires it (real Engine, real Shard, real HTTP server); tests talk to it over loopback with http.client.
Import the fixture into a test module with `from tests.runtime_fixtures import runtime_server`.
Also: `tenant()` builds a TenantConfig for a WAT fixture in tests/fixtures/.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tensorwasm.api.tenant import Limits
from tensorwasm.runtime import metrics
from tensorwasm.runtime.accel import select_accelerator
from tensorwasm.runtime.api.app import build_app
from tensorwasm.runtime.api.server import serve
from tensorwasm.runtime.engine import Engine
from tensorwasm.runtime.modules import ModuleLoader
from tensorwasm.runtime.shard import Shard, TenantStatus
from tensorwasm.runtime.tenancy.config import ModuleSource, TenantConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures"
T = TypeVar("T")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tenant(
    name: str,
    fixture: str = "echo.wat",
    functions: Sequence[str] = (),
    token: str | None = None,
    **limits: Any,
) -> TenantConfig:
    """A tenant serving tests/fixtures/<fixture>; `limits` are Limits fields."""
    path = FIXTURES / fixture
    return TenantConfig(
        name=name,
        token=token or f"token-{name}-0123456789",
        module=ModuleSource(sha256=sha256_of(path), path=path),
        functions=tuple(functions),
        limits=Limits(**limits),
    )


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RuntimeServer:
    """Handle on a running shard: its URL, its Shard, and helpers to call it."""

    port: int
    shard: Shard
    loop: asyncio.AbstractEventLoop
    _conns: threading.local = field(default_factory=threading.local)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the server's loop (e.g. `shard.sync(...)`) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sync(self, configs: Sequence[TenantConfig], failed: dict[str, TenantStatus] | None = None) -> None:
        self.run(self.shard.sync(list(configs), failed))

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> Reply:
        """One HTTP request on a per-thread keep-alive connection. A kept connection the shard has
        closed meanwhile (idle past its keep-alive timeout, the header timeout: 10 s) fails before
        any answer; the request goes again once on a new connection, as HTTP clients do."""
        conn = getattr(self._conns, "conn", None)
        kept = conn is not None
        if conn is None:
            conn = self._conns.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
        except (BrokenPipeError, ConnectionResetError):  # http.client.RemoteDisconnected is one too
            conn.close()
            self._conns.conn = None
            if not kept:
                raise
            return self.request(method, path, body, token, headers, timeout)
        except (http.client.HTTPException, OSError):
            conn.close()
            self._conns.conn = None
            raise
        if resp.getheader("Connection", "").lower() == "close":
            conn.close()
            self._conns.conn = None
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)

    def invoke(self, cfg: TenantConfig, function: str, body: bytes = b"", **kw: Any) -> Reply:
        return self.request("POST", f"/v1/functions/{function}/invoke", body, token=cfg.token, **kw)


def start_runtime_server(
    configs: Sequence[TenantConfig] = (), *, accelerator_mode: str = "cpu", **shard_options: Any
) -> Iterator[RuntimeServer]:
    """Start a shard serving `configs` on `accelerator_mode` (`shard_options`: more Shard fields);
    yields the handle, then stops everything."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="runtime-server", daemon=True)
    thread.start()
    accelerator = select_accelerator(accelerator_mode)
    engine = Engine(epoch_tick_s=0.001)
    shard_box: list[Shard] = []

    async def start() -> tuple[Any, int]:
        shard = Shard(engine, accelerator, ModuleLoader(engine, 64 << 20, 10.0), **shard_options)
        shard_box.append(shard)
        metrics.TENANT_LOAD.source = shard.load_report
        metrics.INVOKES.source = shard.invoke_report
        await shard.sync(list(configs))
        # One listener in tests: the admin routes (/metrics, /readyz detail) on it too.
        return await serve(build_app(shard, include_admin=True), "127.0.0.1", 0)

    runner, port = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    server = RuntimeServer(port, shard_box[0], loop)
    try:
        yield server
    finally:

        async def stop() -> None:
            await runner.cleanup()
            await server.shard.close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        metrics.TENANT_LOAD.source = lambda: ()
        metrics.INVOKES.source = lambda: ()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        engine.close()
        accelerator.close()


@pytest.fixture
def runtime_server() -> Iterator[Callable[..., RuntimeServer]]:
    """Factory: `runtime_server([tenant("alpha"), ...])` starts a real shard; all are stopped at teardown."""
    stack: list[Iterator[RuntimeServer]] = []

    def make(configs: Sequence[TenantConfig] = (), **shard_options: Any) -> RuntimeServer:
        gen = start_runtime_server(configs, **shard_options)
        server = next(gen)
        stack.append(gen)
        return server

    yield make
    for gen in reversed(stack):
        for _ in gen:  # runs the generator's cleanup
            pass
