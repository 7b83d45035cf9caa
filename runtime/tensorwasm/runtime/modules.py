"""Module fetch, verification and compilation for the shard.

Owns `ModuleLoader`: bytes come from a local file, a ConfigMap (already resolved by the Kubernetes
source) or an HTTP(S) URL read with a size limit; the sha256 digest is required and checked before
anything else sees the bytes; compilation goes through the Engine (which caches on disk by digest
and engine config) once per digest per process. Every failure is a `ModuleRejected` whose `reason`
detail is the CamelCase status reason the shard reports (FetchFailed, ModuleTooLarge, DigestMismatch,
ModuleRejected). Must not import wasmtime or cuda (the Engine does the compiling).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from tensorwasm.runtime.errors import ModuleRejected, RuntimeFault
from tensorwasm.runtime.tenancy.config import ModuleSource

if TYPE_CHECKING:
    from tensorwasm.runtime.engine import CompiledModule, Engine

log = logging.getLogger(__name__)

FETCH_FAILED = "FetchFailed"
TOO_LARGE = "ModuleTooLarge"
DIGEST_MISMATCH = "DigestMismatch"
REJECTED = "ModuleRejected"


def rejected(reason: str, message: str, **details: Any) -> ModuleRejected:
    return ModuleRejected(message, reason=reason, **details)


class ModuleLoader:
    """Fetch -> verify -> compile, with one compiled module per digest shared by every tenant using it."""

    def __init__(
        self,
        engine: Engine,
        max_bytes: int,
        fetch_timeout_s: float,
        allowed_dirs: Sequence[Path] | None = None,
    ) -> None:
        self._engine = engine
        # Module paths must resolve (symlinks followed) inside one of these; None: no confinement.
        self._allowed = None if allowed_dirs is None else tuple(Path(d).resolve() for d in allowed_dirs)
        self._max_bytes = max_bytes
        self._timeout = aiohttp.ClientTimeout(total=fetch_timeout_s)
        self._compiled: dict[str, CompiledModule] = {}
        self._inflight: dict[str, asyncio.Future[CompiledModule]] = {}

    async def load(self, source: ModuleSource) -> CompiledModule:
        """The compiled module for `source`; raises ModuleRejected with a status reason."""
        cached = self._compiled.get(source.sha256)
        if cached is not None and source.path is None:
            return cached  # ConfigMap/URL bytes are immutable under their digest
        data = await self.fetch(source)
        verify(data, source, self._max_bytes)
        if cached is not None:
            return cached
        pending = self._inflight.get(source.sha256)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[CompiledModule] = asyncio.get_running_loop().create_future()
        self._inflight[source.sha256] = fut
        try:
            module = await asyncio.to_thread(self._compile, data, source)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # consumed here; waiters re-raise it
            raise
        finally:
            del self._inflight[source.sha256]
        fut.set_result(module)
        self._compiled[source.sha256] = module
        return module

    def forget_unused(self, in_use: set[str]) -> None:
        """Drop compiled modules no tenant references any more."""
        for digest in list(self._compiled):
            if digest not in in_use:
                del self._compiled[digest]

    def _compile(self, data: bytes, source: ModuleSource) -> CompiledModule:
        try:
            module = self._engine.compile(data, source.sha256)
        except ModuleRejected as exc:
            exc.details.setdefault("reason", REJECTED)
            raise
        except RuntimeFault:
            raise
        except Exception as exc:  # the engine's own validation errors, worded by wasmtime
            raise rejected(REJECTED, f"module from {source.describe()} failed to compile: {exc}") from exc
        return module

    async def fetch(self, source: ModuleSource) -> bytes:
        if source.data is not None:
            return source.data
        if source.path is not None:
            return await asyncio.to_thread(self._read_file, source)
        assert source.url is not None
        return await self._fetch_url(source.url)

    def _read_file(self, source: ModuleSource) -> bytes:
        assert source.path is not None
        if self._allowed is not None:
            real = source.path.resolve()
            if not any(real.is_relative_to(d) for d in self._allowed):
                # Not opened at all: a path outside the allowed directories reveals nothing.
                raise rejected(
                    FETCH_FAILED,
                    f"module file {source.path} is outside the allowed module directories "
                    f"({', '.join(map(str, self._allowed))}; see --module-dirs)",
                )
        try:
            with source.path.open("rb") as fh:
                data = fh.read(self._max_bytes + 1)
        except OSError as exc:
            raise rejected(FETCH_FAILED, f"cannot read module file {source.path}: {exc.strerror}") from exc
        return data

    async def _fetch_url(self, url: str) -> bytes:
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.get(url) as resp,
            ):
                if resp.status != 200:
                    raise rejected(
                        FETCH_FAILED, f"GET {url} answered HTTP {resp.status}", http_status=resp.status
                    )
                if resp.content_length is not None and resp.content_length > self._max_bytes:
                    raise _too_large(url, resp.content_length, self._max_bytes)
                chunks, total = [], 0
                async for chunk in resp.content.iter_chunked(1 << 16):
                    total += len(chunk)
                    if total > self._max_bytes:
                        raise _too_large(url, total, self._max_bytes)
                    chunks.append(chunk)
                return b"".join(chunks)
        except ModuleRejected:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            detail = str(exc) or type(exc).__name__
            raise rejected(FETCH_FAILED, f"GET {url} failed: {detail}") from exc


def verify(data: bytes, source: ModuleSource, max_bytes: int) -> None:
    """Size first (cheap), then the digest; nothing unverified reaches the compiler."""
    if len(data) > max_bytes:
        raise _too_large(source.describe(), len(data), max_bytes)
    actual = hashlib.sha256(data).hexdigest()
    if actual != source.sha256:
        # The fetched bytes' own digest is not echoed: it would tell whoever reads the status
        # something about a file or URL they may not be entitled to (a probe of the shard's disk).
        raise rejected(
            DIGEST_MISMATCH,
            f"module from {source.describe()} does not match the expected sha256 {source.sha256}",
            expected=source.sha256,
        )


def _too_large(where: str, size: int, limit: int) -> ModuleRejected:
    return rejected(
        TOO_LARGE,
        f"module from {where} is larger than the {limit}-byte limit (at least {size} bytes)",
        limit=limit,
    )
