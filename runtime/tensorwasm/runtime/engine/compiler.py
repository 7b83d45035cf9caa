"""The shard's one wasmtime Engine: configuration, the epoch ticker, validation and the compile cache.

Owns: wasmtime Config (epoch interruption, no fuel, fixed memory base), the ticker thread that
advances the epoch (parked while no guest code can be running: an idle shard costs no wake-ups),
module checks against guest ABI v1, and the on-disk cache of compiled code keyed by module digest
and engine fingerprint. Must not import the accelerator or the HTTP layer.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wasmtime

from tensorwasm.runtime import metrics
from tensorwasm.runtime.engine import abi, hostcalls, lowlevel, wasmbin
from tensorwasm.runtime.errors import BadRequest, ModuleRejected

log = logging.getLogger(__name__)

DEFAULT_MAX_MODULE_BYTES = 32 << 20
DEFAULT_MAX_WASM_STACK = 512 << 10
# Bump when anything that changes compiled artifacts or their rewrite changes.
_ARTIFACT_VERSION = "tw-engine-1"
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


class Engine:
    """One per shard process; thread-safe. Call `close()` to stop the ticker."""

    def __init__(
        self,
        cache_dir: Path | None = None,
        epoch_tick_s: float = 0.001,
        max_module_bytes: int = DEFAULT_MAX_MODULE_BYTES,
        max_wasm_stack: int = DEFAULT_MAX_WASM_STACK,
        park_after_s: float = 1.0,
    ) -> None:
        if not 0 < epoch_tick_s <= 1:
            raise BadRequest(f"epoch tick must be in (0, 1] seconds, got {epoch_tick_s!r}")
        if not 0 <= park_after_s <= 3600:
            raise BadRequest(f"park_after_s must be in [0, 3600] seconds, got {park_after_s!r}")
        self.epoch_tick_s = epoch_tick_s
        # The ticker parks once every deadline set so far has passed, plus this many ticks: steady
        # light traffic never pays a wake-up, an idle shard stops waking 1,000 times a second.
        self._linger_ticks = math.ceil(park_after_s / epoch_tick_s)
        self._epoch = 0  # ticks so far (the engine's epoch, as this thread last advanced it)
        # Every instance that may run guest code, each with the epoch its last deadline falls at:
        # read only when the ticker is about to park, so the hot path takes no lock.
        self._runners: weakref.WeakSet[Any] = weakref.WeakSet()
        self._runners_lock = threading.Lock()
        self._parked = False
        self._unpark = threading.Event()
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
        self._linker = wasmtime.Linker(self._wt)
        hostcalls.define_all(self._linker)
        self._engine_ptr = lowlevel.pointer_value(self._wt.ptr())
        self._closed = False
        self._ticker = threading.Thread(target=self._tick, name="wasm-epoch-ticker", daemon=True)
        self._ticker.start()
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)

    @property
    def wasmtime_engine(self) -> wasmtime.Engine:
        return self._wt

    def ticks_for(self, timeout_s: float) -> int:
        """Epoch ticks for a deadline, never early: rounded up, +1 because the tick running when the
        deadline is set may be nearly over. Ticks are at least `epoch_tick_s` apart, so a guest is
        stopped no sooner than `timeout_s` and at most about two ticks later."""
        return max(1, math.ceil(round(timeout_s / self.epoch_tick_s, 6))) + 1

    def track(self, runner: Any) -> None:
        """Register an instance that will run guest code (it gets a `deadline_epoch` attribute)."""
        runner.deadline_epoch = 0
        with self._runners_lock:
            self._runners.add(runner)

    def guest_runs(self, ticks: int, runner: Any) -> None:
        """Hot path: `runner` (tracked) is about to run guest code with a deadline `ticks` from now.

        Call before setting the deadline. The runner publishes its deadline, then reads the ticker's
        flag; the ticker publishes the flag, then reads every deadline before it parks: either this
        sees it parked and wakes it, or it sees the deadline and keeps ticking. No lock: a runner is
        used by one thread at a time.
        """
        epoch = self._epoch
        runner.deadline_epoch = epoch + ticks + 1
        if self._parked:
            self._unpark.set()

    def _busy_until(self) -> int:
        """The latest deadline any tracked runner has set (the ticker must reach it)."""
        with self._runners_lock:
            runners = list(self._runners)
        return max((r.deadline_epoch for r in runners), default=0)

    @property
    def ticker_parked(self) -> bool:
        return self._parked

    def _tick(self) -> None:
        # time.sleep, not Event.wait: per tick this thread takes the GIL for one flag test and one
        # C call (Event.wait runs a Python Condition each time), so it seldom makes the event loop
        # wait, and it seldom gets preempted while holding the GIL on a busy machine.
        ptr, tick, sleep, increment, linger = (
            self._engine_ptr,
            self.epoch_tick_s,
            time.sleep,
            lowlevel.increment_epoch,
            self._linger_ticks,
        )
        epoch, check_at = 0, linger
        while not self._closed:
            sleep(tick)
            increment(ptr)
            epoch += 1
            self._epoch = epoch
            if epoch < check_at:
                continue
            # Deadlines are read at most once per linger: calls meanwhile move the next look.
            check_at = self._busy_until() + linger
            if epoch <= check_at:
                continue
            self._parked = True
            if epoch > self._busy_until() + linger and not self._closed:
                self._unpark.wait()
            self._unpark.clear()
            self._parked = False

    def close(self) -> None:
        self._closed = True
        self._unpark.set()
        self._ticker.join(timeout=max(1.0, 2 * self.epoch_tick_s))

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
        module, from_cache = self._cached(digest) if self.cache_dir is not None else (None, False)
        if module is None:
            binary = _to_binary(wasm)
            try:
                wasmtime.Module.validate(self._wt, binary)
            except wasmtime.WasmtimeError as exc:
                raise ModuleRejected(f"invalid WebAssembly module: {_first_line(exc)}") from None
            try:
                rewritten = wasmbin.export_mutable_globals(binary)
                module = wasmtime.Module(self._wt, rewritten)
            except (wasmbin.WasmFormatError, IndexError) as exc:
                raise ModuleRejected(f"module could not be prepared: {exc}") from None
            except wasmtime.WasmtimeError as exc:
                raise ModuleRejected(f"module failed to compile: {_first_line(exc)}") from None
            self._store(digest, module)
        compiled = self._inspect(digest, module, from_cache, time.perf_counter() - started)
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

    def _cache_path(self, digest: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{digest}-{self.fingerprint}.cwasm"

    def _cached(self, digest: str) -> tuple[wasmtime.Module | None, bool]:
        path = self._cache_path(digest)
        if not path.is_file():
            return None, False
        try:
            # Read into memory rather than mmap the file: a cache file truncated underneath a loaded
            # module would otherwise crash the shard with SIGBUS.
            return wasmtime.Module.deserialize(self._wt, path.read_bytes()), True
        except (wasmtime.WasmtimeError, OSError) as exc:
            # A torn or foreign artifact is not fatal: drop it and compile again.
            log.warning("Discarded cached module path=%s reason=%s", path, _first_line(exc))
            path.unlink(missing_ok=True)
            return None, False

    def _store(self, digest: str, module: wasmtime.Module) -> None:
        if self.cache_dir is None:
            return
        path = self._cache_path(digest)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-", suffix=".cwasm")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(module.serialize())
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("Skipped caching compiled module path=%s reason=%s", path, exc)
            Path(tmp).unlink(missing_ok=True)

    # --- ABI checks ---

    def _inspect(
        self, digest: str, module: wasmtime.Module, from_cache: bool, seconds: float
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
