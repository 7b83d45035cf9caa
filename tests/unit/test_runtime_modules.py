"""Module fetch and verification: file and HTTP(S) URL sources, digest, size limit, compile once."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tensorwasm.runtime.engine import Engine
from tensorwasm.runtime.errors import ModuleRejected
from tensorwasm.runtime.modules import ModuleLoader
from tensorwasm.runtime.tenancy.config import ModuleSource
from tests.runtime_fixtures import FIXTURES

ECHO = (FIXTURES / "echo.wat").read_bytes()
ECHO_SHA = hashlib.sha256(ECHO).hexdigest()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine(cache_dir=tmp_path / "cache")
    yield eng
    eng.close()


async def serving(routes: dict[str, web.Response]) -> AsyncIterator[str]:
    app = web.Application()
    for path, response in routes.items():
        app.router.add_get(path, _handler(response))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _handler(r: web.Response):  # type: ignore[no-untyped-def]
    async def respond(_request: web.Request) -> web.Response:
        return web.Response(body=r.body, status=r.status)

    return respond


def reason_of(exc: pytest.ExceptionInfo[ModuleRejected]) -> str:
    return str(exc.value.details["reason"])


def test_url_source_fetch_verify_compile_once(engine: Engine) -> None:
    async def main() -> None:
        routes = {"/echo.wasm": web.Response(body=ECHO), "/gone": web.Response(status=404),
                  "/big": web.Response(body=b"\0" * 5000)}  # fmt: skip
        async for base in serving(routes):
            loader = ModuleLoader(engine, max_bytes=4096, fetch_timeout_s=5)
            first = await loader.load(ModuleSource(sha256=ECHO_SHA, url=f"{base}/echo.wasm"))
            again = await loader.load(ModuleSource(sha256=ECHO_SHA, url=f"{base}/echo.wasm"))
            assert first is again and "echo" in first.functions
            with pytest.raises(ModuleRejected) as exc:
                await loader.load(ModuleSource(sha256="1" * 64, url=f"{base}/echo.wasm"))
            assert reason_of(exc) == "DigestMismatch" and "actual" not in exc.value.details
            assert ECHO_SHA not in exc.value.message  # the fetched content's digest is never echoed
            # A digest already compiled is not fetched again (content-addressed), so use another one.
            other = "2" * 64
            with pytest.raises(ModuleRejected) as exc:
                await loader.load(ModuleSource(sha256=other, url=f"{base}/gone"))
            assert reason_of(exc) == "FetchFailed" and "HTTP 404" in exc.value.message
            with pytest.raises(ModuleRejected) as exc:
                await loader.load(ModuleSource(sha256=other, url=f"{base}/big"))
            assert reason_of(exc) == "ModuleTooLarge" and exc.value.details["limit"] == 4096
            with pytest.raises(ModuleRejected) as exc:
                await loader.load(ModuleSource(sha256=other, url="http://127.0.0.1:9/refused"))
            assert reason_of(exc) == "FetchFailed"

    asyncio.run(main())


def test_file_and_inline_sources(engine: Engine, tmp_path: Path) -> None:
    async def main() -> None:
        loader = ModuleLoader(engine, max_bytes=1 << 20, fetch_timeout_s=5)
        assert (
            "echo" in (await loader.load(ModuleSource(sha256=ECHO_SHA, path=FIXTURES / "echo.wat"))).functions
        )
        with pytest.raises(ModuleRejected) as exc:
            await loader.load(ModuleSource(sha256=ECHO_SHA, path=tmp_path / "missing.wat"))
        assert reason_of(exc) == "FetchFailed"
        junk = b"(module (func $broken"
        with pytest.raises(ModuleRejected) as exc:
            await loader.load(ModuleSource(sha256=hashlib.sha256(junk).hexdigest(), data=junk))
        assert reason_of(exc) == "ModuleRejected"

    asyncio.run(main())


def test_module_paths_outside_the_allowed_directories_are_not_read(engine: Engine, tmp_path: Path) -> None:
    allowed, outside = tmp_path / "modules", tmp_path / "elsewhere"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "echo.wat").write_bytes(ECHO)
    (outside / "secret.wat").write_bytes(ECHO)
    (allowed / "link.wat").symlink_to(outside / "secret.wat")  # a symlink does not get out either

    async def main() -> None:
        loader = ModuleLoader(engine, max_bytes=1 << 20, fetch_timeout_s=5, allowed_dirs=[allowed])
        ok = await loader.load(ModuleSource(sha256=ECHO_SHA, path=allowed / "echo.wat"))
        assert "echo" in ok.functions
        for path in (
            outside / "secret.wat",
            allowed / "link.wat",
            allowed / ".." / "elsewhere" / "secret.wat",
        ):
            with pytest.raises(ModuleRejected) as exc:
                await loader.load(ModuleSource(sha256="3" * 64, path=path))
            assert (
                reason_of(exc) == "FetchFailed"
                and "outside the allowed module directories" in exc.value.message
            )

    asyncio.run(main())
