"""One warm wasm instance: its own Store, a preallocated call path, and reset to a baseline.

Owns the hot path of an invoke (`call`) and the reset between invokes (`reset`). An instance is
used by one thread at a time (the pool guarantees it): wasmtime Stores are not thread-safe.
Must not import the accelerator or the HTTP layer.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import Any

import wasmtime

from tensorwasm.runtime.engine import abi, hostcalls, lowlevel
from tensorwasm.runtime.engine.budget import TenantBudget
from tensorwasm.runtime.engine.compiler import CompiledModule, Engine
from tensorwasm.runtime.engine.limits import WASM_PAGE, GuestLimits
from tensorwasm.runtime.errors import (
    DeadlineExceeded,
    GuestLimitExceeded,
    GuestMemoryExceeded,
    GuestTrap,
    RuntimeFault,
)

_memmove = ctypes.memmove
_copy = lowlevel.memmove_quick
_QUICK = lowlevel.QUICK_COPY_BYTES
_string_at = ctypes.string_at
_U32 = 0xFFFF_FFFF
_TRAP_STACK_OVERFLOW = 0
_TRAP_INTERRUPT = 10
_VALKIND = {"i32": 0, "i64": 1, "f32": 2, "f64": 3}


@dataclass
class Baseline:
    """What every invoke starts from: memory bytes and mutable global values (export name order)."""

    memory: bytes
    globals: list[tuple[str, str, int | float]]


class WarmInstance:
    """An instantiated module in its own store; not thread-safe by design."""

    def __init__(
        self,
        engine: Engine,
        module: CompiledModule,
        limits: GuestLimits,
        device: Any,
        tenant_id: str,
        budget: TenantBudget | None = None,
        start_ticks: int | None = None,
    ) -> None:
        self.memory_limit = limits.memory_bytes
        self.max_output = limits.max_output_bytes
        self._store = store = wasmtime.Store(engine.wasmtime_engine)
        store.set_limits(
            memory_size=limits.memory_bytes,
            table_elements=limits.table_elements,
            instances=1,
            tables=limits.tables,
            memories=1,
        )
        self.ll = ll = engine.ll  # the direct C path, or wasmtime-py's public API (lowlevel.select)
        self.ctx = ctx = ll.store_context(store)
        engine.track(self)
        # A start function is guest code like any other: it runs under the tenant's deadline.
        ticks = engine.ticks_for(limits.timeout_s) if start_ticks is None else start_ticks
        if module.has_start:
            ticks = engine.guest_runs(ticks, self)
        ll.set_epoch_deadline(ctx, ticks)
        try:
            instance = module.pre.instantiate(store)
        except wasmtime.Trap as trap:
            if trap.trap_code == wasmtime.TrapCode.INTERRUPT:
                raise DeadlineExceeded("the module's start function ran past the deadline") from None
            raise GuestTrap(f"module start function trapped: {_reason(trap.message)}") from None
        except wasmtime.WasmtimeError as exc:
            raise GuestTrap(f"module could not be instantiated: {_first_line(str(exc))}") from None
        exports = instance.exports(store)
        self._keep = exports  # the Func/Memory/Global objects own the structs we point into
        memory = exports[abi.MEMORY_EXPORT]
        self.mem = ll.memory_address(memory)
        self.base = ll.memory_data(ctx, self.mem)
        self.size: int = ll.memory_data_size(ctx, self.mem)
        self.funcs = {name: ll.func_address(exports[name]) for name in module.functions}
        self.alloc = ll.func_address(exports[abi.ALLOC_EXPORT])
        self.init = ll.func_address(exports[abi.INIT_EXPORT]) if module.has_init else 0
        self.globals = [(name, vt, ll.global_address(exports[name])) for name, vt in module.mutable_globals]
        # Every table with its size now: reset replaces an instance whose table grew.
        self.tables = [
            (addr, ll.table_size(ctx, addr))
            for addr in (ll.table_address(exports[name]) for name in module.tables)
        ]
        # Hot path: bound once.
        self._call, self._deadline = ll.func_call_unchecked, ll.set_epoch_deadline
        self._slots = (ll.ValRaw * 2)()
        self._slots_addr = ctypes.addressof(self._slots)
        self._q = memoryview(self._slots).cast("B").cast("q")  # slot i = index 2*i
        self._trap = ctypes.c_void_p()
        self._trap_addr = ctypes.addressof(self._trap)
        self._reset_vals: list[tuple[int, Any]] = []  # (global addr, wasmtime_val_t)
        self._baseline: bytes = b""
        self._zap = False  # reset by dropping dirty pages instead of copying (see can_zap)
        self.host = hostcalls.GuestContext(
            ctx,
            self.mem,
            self.base,
            device,
            tenant_id,
            budget,
            limits.host_calls_per_invoke,
            limits.log_bytes_per_invoke,
            ll,
        )
        hostcalls.register(self.host)
        # From here on (after the start function) the store deadline goes in slices and a
        # callback on this thread checks the real deadline and the run's cancel flag.
        self.slice_ticks = engine.watch(store, self)

    def close(self) -> None:
        hostcalls.unregister(self.host)
        self._keep = None

    # --- hot path ---

    def call(self, func: int, payload: bytes, ticks: int) -> bytes:
        """Copy `payload` in through tw_alloc, run `func`, copy the output out. Raises RuntimeFault."""
        ctx, q, slots, call = self.ctx, self._q, self._slots_addr, self._call
        self.host.begin()
        self._deadline(ctx, ticks if ticks <= self.slice_ticks else self.slice_ticks)
        n = len(payload)
        ptr = 0
        if n:  # empty input: the guest gets (0, 0) and tw_alloc is not called
            q[0] = n
            err = call(ctx, self.alloc, slots, 2, self._trap_addr)
            if err or self._trap.value:
                raise self._failure(err)
            ptr = q[0] & _U32
            if ptr == 0:
                raise self._alloc_failed(n)
            self._check(ptr, n, "tw_alloc returned")
            (_copy if n <= _QUICK else _memmove)(self.base + ptr, payload, n)
        q[0] = ptr
        q[2] = n
        err = call(ctx, func, slots, 2, self._trap_addr)
        if err or self._trap.value:
            raise self._failure(err)
        packed = q[0] & 0xFFFF_FFFF_FFFF_FFFF
        if packed == abi.FAILED:
            raise self._guest_gave_up()
        out_ptr, out_len = packed >> 32, packed & _U32
        if not out_len:
            return b""
        self._check(out_ptr, out_len, "function returned")
        if out_len > self.max_output:  # checked before copying: an oversize output costs no host memory
            raise GuestLimitExceeded(
                f"the function returned {out_len} bytes, over the {self.max_output}-byte output limit",
                limit="maxOutputBytes",
                value=self.max_output,
            )
        return _string_at(self.base + out_ptr, out_len)

    def _check(self, ptr: int, n: int, what: str) -> None:
        if ptr + n > self.size:  # memory only grows: re-read the size before refusing
            self.size = self.ll.memory_data_size(self.ctx, self.mem)
            if ptr + n > self.size:
                raise GuestTrap(f"{what} range ptr={ptr} len={n} outside linear memory of {self.size} bytes")

    def reset(self) -> bool:
        """Put memory and globals back to the baseline; False if the instance must be replaced."""
        ctx = self.ctx
        for addr, val in self._reset_vals:
            if self.ll.global_set(ctx, addr, ctypes.addressof(val)):
                return False
        self.size = self.ll.memory_data_size(ctx, self.mem)
        if self.size != len(self._baseline):
            return False  # memory cannot shrink: a fresh instance is the only honest reset
        for addr, size in self.tables:
            if self.ll.table_size(ctx, addr) != size:
                return False  # tables cannot shrink either: a grown one would keep its memory
        if self._zap:
            return lowlevel.discard_pages(self.base, self.size)
        (_copy if self.size <= _QUICK else _memmove)(self.base, self._baseline, self.size)
        return True

    def can_zap(self, baseline: Baseline) -> bool:
        """Whether dropping dirty pages restores `baseline` exactly, proven on this instance.

        wasmtime maps linear memory copy-on-write from the module's initial image (or zero pages), so
        madvise(DONTNEED) puts back the *module's* initial contents at the cost of one syscall plus a
        page fault per page the next invoke touches, instead of copying all of memory. Only valid while
        the baseline is that initial state; we check it by scribbling over memory and comparing.
        """
        n = len(baseline.memory)
        ctypes.memset(self.base, 0xA5, n)
        ok = lowlevel.discard_pages(self.base, n) and _string_at(self.base, n) == baseline.memory
        if not ok:
            _memmove(self.base, baseline.memory, n)
        return ok

    def use_zap(self, enabled: bool) -> None:
        self._zap = enabled

    # --- baseline (pool setup, snapshots) ---

    def run_init(self, ticks: int) -> None:
        if not self.init:
            return
        self.host.begin()
        self.ll.set_epoch_deadline(self.ctx, ticks)
        err = self.ll.func_call_unchecked(self.ctx, self.init, self._slots_addr, 1, self._trap_addr)
        if err or self._trap.value:
            raise self._failure(err)
        rc = struct.unpack("<i", struct.pack("<q", self._q[0])[:4])[0]
        if rc < 0:
            raise self.host.fault or GuestTrap(f"tw_init failed with code {rc}")

    def capture(self) -> Baseline:
        self.size = self.ll.memory_data_size(self.ctx, self.mem)
        memory = _string_at(self.base, self.size)
        values = []
        raw = self.ll.Val()
        for name, vt, addr in self.globals:
            self.ll.global_get(self.ctx, addr, ctypes.addressof(raw))
            values.append((name, vt, getattr(raw.of, vt)))
        return Baseline(memory, values)

    def adopt(self, baseline: Baseline, write: bool) -> bool:
        """Make `baseline` what reset restores; with `write`, also load it now. False if too small."""
        self.size = self.ll.memory_data_size(self.ctx, self.mem)
        want = len(baseline.memory)
        if want < self.size:
            return False
        vals = []
        for (name, vt, addr), (bname, bvt, value) in zip(self.globals, baseline.globals, strict=True):
            assert (name, vt) == (bname, bvt)
            val = self.ll.Val()
            val.kind = _VALKIND[vt]  # type: ignore[assignment]
            setattr(val.of, vt, value)
            vals.append((addr, val))
        self._reset_vals = vals
        self._baseline = baseline.memory
        if write:
            if want > self.size:
                prev = ctypes.c_uint64()
                err = self.ll.memory_grow(
                    self.ctx, self.mem, (want - self.size) // WASM_PAGE, ctypes.addressof(prev)
                )
                if err:
                    raise GuestMemoryExceeded(
                        f"restoring {want} bytes of linear memory failed: {self.ll.take_error(err)}"
                    )
                self.size = self.ll.memory_data_size(self.ctx, self.mem)
            return self.reset()
        return True

    # --- failures ---

    def _failure(self, err: int | None) -> RuntimeFault:
        trap_addr = self._trap.value
        self._trap.value = None
        if err:
            message = self.ll.take_error(err)  # always taken: it is freed only then
            return self.host.fault or GuestTrap(f"guest call failed: {message}")
        assert trap_addr
        message, code = self.ll.take_trap(trap_addr)
        if code == _TRAP_INTERRUPT:
            return DeadlineExceeded("the invoke ran past its deadline and was interrupted")
        if self.host.fault is not None:
            return self.host.fault  # the guest trapped after a failed host call: that is the cause
        if self._memory_at_cap():
            return GuestMemoryExceeded(
                f"guest trapped with linear memory at its {self.memory_limit} byte limit: {_reason(message)}",
                limit=self.memory_limit,
            )
        if code == _TRAP_STACK_OVERFLOW:
            return GuestTrap("guest trapped: call stack exhausted (stack overflow)", trap="stack_overflow")
        return GuestTrap(f"guest trapped: {_reason(message)}")

    def _memory_at_cap(self) -> bool:
        # Store limits make memory.grow return -1 silently; a guest that then fails with its memory
        # this close to the cap is reported as out of memory (heuristic, see docs/guest-abi.md).
        self.size = int(self.ll.memory_data_size(self.ctx, self.mem))
        margin = max(WASM_PAGE, self.memory_limit // 8)
        return self.size > self.memory_limit - margin

    def _alloc_failed(self, n: int) -> RuntimeFault:
        if self._memory_at_cap() or n > self.memory_limit:
            return GuestMemoryExceeded(
                f"guest could not allocate {n} input bytes within its {self.memory_limit} byte limit",
                limit=self.memory_limit,
            )
        return GuestTrap(f"tw_alloc({n}) returned 0")

    def _guest_gave_up(self) -> RuntimeFault:
        if self.host.fault is not None:
            return self.host.fault
        if self._memory_at_cap():
            return GuestMemoryExceeded(
                f"guest failed with linear memory at its {self.memory_limit} byte limit",
                limit=self.memory_limit,
            )
        return GuestTrap("guest function reported failure (returned -1)")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


def _reason(message: str) -> str:
    """The cause line of a wasmtime trap message ("wasm trap: ..."), without the backtrace."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("wasm trap:"):
            return ln.removeprefix("wasm trap:").strip()
    return lines[-1] if lines else "unknown trap"
