"""The shard's one wasmtime Engine: configuration, validation and compilation.

Owns: wasmtime Config (epoch interruption, no fuel, fixed memory base), module checks against guest
ABI v1, and compiling (through the authenticated disk cache of `cache.py`, keyed by module digest
and engine fingerprint). The epoch ticker behind deadlines is `ticker.py`'s; the Engine wires it
to the wasmtime engine. Must not import the accelerator or the HTTP layer.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wasmtime

from tensorwasm.runtime import metrics
from tensorwasm.runtime.engine import abi, deadlines, hostcalls, lowlevel, wasmbin
from tensorwasm.runtime.engine.cache import CacheKeyError, CompileCache, load_or_create_key
from tensorwasm.runtime.engine.ticker import EpochTicker
from tensorwasm.runtime.errors import BadRequest, ModuleRejected

log = logging.getLogger(__name__)

DEFAULT_MAX_MODULE_BYTES = 32 << 20
DEFAULT_MAX_WASM_STACK = 512 << 10
# Bump when anything that changes compiled artifacts or their rewrite changes.
_ARTIFACT_VERSION = "tw-engine-2"  # 2: tables exported too
_VALTYPES = {"i32", "i64", "f32", "f64"}


@dataclass(frozen=True)
class CompiledModule:
    """A validated, compiled module ready to instantiate on the engine that made it."""

    sha256: str
    functions: tuple[str, ...]
    has_init: bool
    min_memory_bytes: int
    mutable_globals: tuple[tuple[str, str], ...]  # (export name, valtype)
    from_cache: bool
    compile_seconds: float
    module: Any = field(repr=False)  # wasmtime.Module
    pre: Any = field(repr=False)  # wasmtime.InstancePre
    engine_id: int = field(repr=False, default=0)
    has_start: bool = False  # a start function runs guest code at every instantiation
    tables: tuple[str, ...] = ()  # export names of every defined table (reset checks their size)


class Engine:
    """One per shard process; thread-safe. Call `close()` to stop the ticker."""

    def __init__(
        self,
        cache_dir: Path | None = None,
        epoch_tick_s: float = 0.001,
        max_module_bytes: int = DEFAULT_MAX_MODULE_BYTES,
        max_wasm_stack: int = DEFAULT_MAX_WASM_STACK,
        park_after_s: float = 1.0,
        cache_key_file: Path | None = None,
        wasmtime_api: str | None = None,
    ) -> None:
        if not 0 < epoch_tick_s <= 1:
            raise BadRequest(f"epoch tick must be in (0, 1] seconds, got {epoch_tick_s!r}")
        if not 0 <= park_after_s <= 3600:
            raise BadRequest(f"park_after_s must be in [0, 3600] seconds, got {park_after_s!r}")
        try:
            # The direct C path (lowlevel.PRIVATE) or wasmtime-py's public API alone (PUBLIC): None
            # reads TENSORWASM_RUNTIME_WASMTIME_API, default private.
            self.ll = lowlevel.select(wasmtime_api)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        self.epoch_tick_s = epoch_tick_s
        self.max_module_bytes = max_module_bytes
        self.cache_dir = cache_dir
        settings = {
            "epoch_interruption": True,
            "consume_fuel": False,
            "cranelift_opt_level": "speed",
            "max_wasm_stack": max_wasm_stack,
            # A fixed base address lets the hot path cache it: memory grows in place, never moves.
            "memory_may_move": False,
            "memory_reservation": 4 << 30,
            "wasm_threads": False,
        }
        config = wasmtime.Config()
        for key, value in settings.items():
            setattr(config, key, value)
        self._wt = wasmtime.Engine(config)
        version = getattr(wasmtime, "__version__", "") or _wasmtime_version()
        self.fingerprint = hashlib.sha256(
            repr((_ARTIFACT_VERSION, version, sorted(settings.items()))).encode()
        ).hexdigest()[:16]
        if self.ll is lowlevel.PUBLIC:
            log.warning(
                "Engine runs on wasmtime-py's public API only (the slow path) reason=%s",
                lowlevel.PRIVATE_UNAVAILABLE or f"{lowlevel.API_ENV}=public",
            )
        elif lowlevel.FALLBACKS:
            log.warning(
                "Engine runs on public-API fallbacks: wasmtime-py moved names=%s (port engine/lowlevel.py)",
                ",".join(lowlevel.FALLBACKS),
            )
        self._linker = wasmtime.Linker(self._wt)
        hostcalls.define_all(self._linker, self.ll)
        self._cache: CompileCache | None = None
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            try:
                mac_key = load_or_create_key(cache_dir, cache_key_file)
            except (CacheKeyError, OSError) as exc:
                raise BadRequest(f"compile cache: {exc}") from None
            self._cache = CompileCache(cache_dir, mac_key)
        engine_ptr, increment = self.ll.ticker(self._wt)
        self._ticker = EpochTicker(engine_ptr, increment, epoch_tick_s, park_after_s)
        self.ticks_for = self._ticker.ticks_for
        self.track = self._ticker.track
        self.guest_runs = self._ticker.guest_runs  # hot path: bound once, no extra frame

    def watch(self, store: wasmtime.Store, instance: Any) -> int:
        """Give a warm instance's store the deadline callback (deadlines.py: cancellation and
        deadlines in slices); the most ticks ahead a call may set its store deadline. The public
        layer calls no C function itself, so there a call sets its whole deadline and a cancel
        waits for the guest's next stream_write or that deadline."""
        if self.ll is not lowlevel.PRIVATE:
            return deadlines.UNSLICED
        return deadlines.watch(store, instance, self._ticker)

    @property
    def wasmtime_engine(self) -> wasmtime.Engine:
        return self._wt

    @property
    def ticker_parked(self) -> bool:
        return self._ticker.parked

    def interrupt_all(self) -> None:
        """Shutdown: stop every guest now and any started later (see EpochTicker.interrupt_all)."""
        self._ticker.interrupt_all()

    def close(self) -> None:
        self._ticker.close()

    def compile(self, wasm: bytes, sha256: str) -> CompiledModule:
        """Validate and compile `wasm` (binary or WAT text), using the disk cache when possible."""
        started = time.perf_counter()
        if not isinstance(wasm, bytes | bytearray | memoryview):
            raise ModuleRejected(f"module must be bytes, got {type(wasm).__name__}")
        wasm = bytes(wasm)
        if len(wasm) > self.max_module_bytes:
            raise ModuleRejected(
                f"module is {len(wasm)} bytes, over the {self.max_module_bytes} byte limit",
                size=len(wasm),
                limit=self.max_module_bytes,
            )
        digest = hashlib.sha256(wasm).hexdigest()
        if digest != sha256.lower():
            raise ModuleRejected(f"module digest {digest} does not match the expected {sha256}")
        module, from_cache = self._cached(digest)
        binary = _to_binary(wasm)
        if module is None:
            try:
                wasmtime.Module.validate(self._wt, binary)
            except wasmtime.WasmtimeError as exc:
                raise ModuleRejected(f"invalid WebAssembly module: {_first_line(exc)}") from None
            try:
                rewritten = wasmbin.export_hidden(binary)
                module = wasmtime.Module(self._wt, rewritten)
            except (wasmbin.WasmFormatError, IndexError) as exc:
                raise ModuleRejected(f"module could not be prepared: {exc}") from None
            except wasmtime.WasmtimeError as exc:
                raise ModuleRejected(f"module failed to compile: {_first_line(exc)}") from None
            self._store(digest, module)
        try:
            has_start = wasmbin.has_start(binary)
        except wasmbin.WasmFormatError as exc:
            raise ModuleRejected(f"module could not be prepared: {exc}") from None
        compiled = self._inspect(digest, module, from_cache, time.perf_counter() - started, has_start)
        metrics.MODULE_COMPILE_SECONDS.labels(cache="hit" if from_cache else "miss").observe(
            compiled.compile_seconds
        )
        log.info(
            "Compiled module sha256=%s functions=%s cache=%s seconds=%.4f",
            digest[:12],
            ",".join(compiled.functions),
            "hit" if from_cache else "miss",
            compiled.compile_seconds,
        )
        return compiled

    # --- cache ---

    def _cache_name(self, digest: str) -> str:
        return f"{digest}-{self.fingerprint}"

    def _cached(self, digest: str) -> tuple[wasmtime.Module | None, bool]:
        if self._cache is None:
            return None, False
        artifact = self._cache.read(self._cache_name(digest))
        if artifact is None:
            return None, False
        try:
            return wasmtime.Module.deserialize(self._wt, artifact), True
        except wasmtime.WasmtimeError as exc:
            # Authentic but unusable (e.g. written by a wasmtime build we cannot tell apart): recompile.
            log.warning("Discarded cached module sha256=%s reason=%s", digest[:12], _first_line(exc))
            self._cache.discard(self._cache_name(digest))
            return None, False

    def _store(self, digest: str, module: wasmtime.Module) -> None:
        if self._cache is not None:
            self._cache.write(self._cache_name(digest), bytes(module.serialize()))

    # --- ABI checks ---

    def _inspect(
        self, digest: str, module: wasmtime.Module, from_cache: bool, seconds: float, has_start: bool
    ) -> CompiledModule:
        for imp in module.imports:
            where = f"import {imp.module}.{imp.name}"
            expected = abi.HOST_FUNCTIONS.get(imp.name or "") if imp.module == abi.HOST_MODULE else None
            if expected is None:
                raise ModuleRejected(f"{where} is not part of guest ABI v1 (module 'tensorwasm' only)")
            ty = imp.type
            if not isinstance(ty, wasmtime.FuncType) or _sig(ty) != expected:
                raise ModuleRejected(
                    f"{where} has the wrong signature: expected {_fmt(expected)}, got {_describe(ty)}"
                )
        exports = {e.name: e.type for e in module.exports}
        mem = exports.get(abi.MEMORY_EXPORT)
        if not isinstance(mem, wasmtime.MemoryType):
            raise ModuleRejected("module must export its linear memory as 'memory' (guest ABI v1)")
        if mem.is_64 or mem.is_shared:
            raise ModuleRejected("memory64 and shared memories are not supported by guest ABI v1")
        alloc = exports.get(abi.ALLOC_EXPORT)
        if not isinstance(alloc, wasmtime.FuncType) or _sig(alloc) != (("i32",), ("i32",)):
            raise ModuleRejected("module must export 'tw_alloc' with signature (i32) -> i32 (guest ABI v1)")
        init = exports.get(abi.INIT_EXPORT)
        if init is not None and (not isinstance(init, wasmtime.FuncType) or _sig(init) != ((), ("i32",))):
            raise ModuleRejected("optional export 'tw_init' must have signature () -> i32")
        functions = tuple(
            name
            for name, ty in exports.items()
            if isinstance(ty, wasmtime.FuncType)
            and _sig(ty) == (("i32", "i32"), ("i64",))
            and not name.startswith((abi.RESERVED_PREFIX, "__"))
        )
        mutable = []
        for name, ty in exports.items():
            if isinstance(ty, wasmtime.GlobalType) and ty.mutable:
                vt = str(ty.content)
                if vt not in _VALTYPES:
                    raise ModuleRejected(f"mutable global {name!r} of type {vt} is not supported")
                mutable.append((name, vt))
        try:
            pre = self._linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise ModuleRejected(f"module cannot be linked: {_first_line(exc)}") from None
        return CompiledModule(
            sha256=digest,
            functions=functions,
            has_init=init is not None,
            min_memory_bytes=mem.limits.min * abi_page(),
            mutable_globals=tuple(mutable),
            from_cache=from_cache,
            compile_seconds=seconds,
            module=module,
            pre=pre,
            engine_id=id(self),
            has_start=has_start,
            tables=tuple(
                name
                for name, ty in exports.items()
                if isinstance(ty, wasmtime.TableType) and name.startswith(wasmbin.TABLE_EXPORT_PREFIX)
            ),
        )


def abi_page() -> int:
    return 64 << 10


def _to_binary(wasm: bytes) -> bytes:
    if wasm[:4] == b"\0asm":
        return wasm
    try:
        text = wasm.decode("utf-8")
    except UnicodeDecodeError:
        raise ModuleRejected("module is neither a WebAssembly binary nor WAT text") from None
    try:
        return bytes(wasmtime.wat2wasm(text))
    except wasmtime.WasmtimeError as exc:
        raise ModuleRejected(f"invalid WAT: {_first_line(exc)}") from None


def _sig(ty: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results)


def _fmt(sig: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    return f"({', '.join(sig[0])}) -> ({', '.join(sig[1])})"


def _describe(ty: Any) -> str:
    return _fmt(_sig(ty)) if isinstance(ty, wasmtime.FuncType) else type(ty).__name__


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _wasmtime_version() -> str:
    from importlib.metadata import version

    return version("wasmtime")
