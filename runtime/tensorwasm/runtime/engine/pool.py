"""A tenant's warm instance pool: thread-safe invoke, reset between calls, snapshot hooks.

Owns: the idle queue of reset instances (its size is the tenant's max concurrency), replacing an
instance that trapped or outgrew its baseline, the baseline every invoke starts from (the module's
initial state, after `tw_init`, or a restored snapshot), and the quiesce barrier.
Must not import the HTTP layer or a concrete accelerator (it receives a TenantDevice).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from tensorwasm.runtime import metrics
from tensorwasm.runtime.engine.budget import TenantBudget
from tensorwasm.runtime.engine.compiler import CompiledModule, Engine
from tensorwasm.runtime.engine.instance import Baseline, WarmInstance
from tensorwasm.runtime.engine.limits import WASM_PAGE, GuestLimits, WasmState
from tensorwasm.runtime.errors import (
    BadRequest,
    DeadlineExceeded,
    ModuleRejected,
    NotFound,
    RuntimeFault,
    SnapshotRejected,
    TenantNotReady,
)
from tensorwasm.runtime.tenancy.deadline import set_deadline

log = logging.getLogger(__name__)
ZAP_MIN_BYTES = 256 << 10  # below this, copying the baseline back beats a syscall + page faults


class TenantInstancePool:
    """Warm, reset instances of one tenant's module; `invoke` may be called from many threads."""

    def __init__(
        self,
        engine: Engine,
        module: CompiledModule,
        limits: GuestLimits,
        device: Any = None,
        tenant_id: str = "",
    ) -> None:
        if module.engine_id != id(engine):
            raise BadRequest("module was compiled by a different Engine")
        if module.min_memory_bytes > limits.memory_bytes:
            raise ModuleRejected(
                f"module starts with {module.min_memory_bytes} bytes of linear memory, "
                f"over the tenant's {limits.memory_bytes} byte limit"
            )
        self.engine, self.module, self.limits = engine, module, limits
        self.device, self.tenant_id = device, tenant_id
        self._functions = frozenset(module.functions)
        self._ticks = engine.ticks_for(limits.timeout_s)
        self._idle: queue.SimpleQueue[WarmInstance | None] = queue.SimpleQueue()
        self._lock = threading.RLock()  # spawn/replace, baseline, quiesce ownership
        self._barrier = threading.Lock()  # one quiescer at a time
        self._owner: int | None = None
        self._depth = 0
        self._held: list[WarmInstance] = []
        self._closed = False
        self._count = 0
        self.budget = TenantBudget(limits.host_calls_per_s, limits.log_bytes_per_s)
        # All guest code of the load (each warm instance's start function, then tw_init) shares
        # one deadline: the tenant's timeout from now. A module that spins at load fails alone.
        self._load_ends: float | None = time.monotonic() + limits.timeout_s
        try:
            first = self._spawn()
        except RuntimeFault as fault:
            raise ModuleRejected(f"module failed to start: {fault.kind}: {fault.message}") from fault
        try:
            # The deadline bounds guest code only: a module without tw_init is not refused because
            # the host took long to instantiate it on a busy machine (no guest code ran).
            ticks = self._load_ticks() if module.has_init else self._ticks
            if module.has_init:  # no tw_init, no guest code: the ticker may stay parked
                ticks = engine.guest_runs(ticks, first)
            first.run_init(ticks)
        except RuntimeFault as fault:
            first.close()
            raise ModuleRejected(
                f"tw_init failed: {fault.kind}: {fault.message}", cause=fault.kind
            ) from fault
        self._baseline: Baseline = first.capture()
        self._custom = module.has_init  # instances must be loaded with the baseline, not just reset to it
        first.adopt(self._baseline, write=False)
        # Large pristine memories reset faster by dropping dirty pages than by copying them back.
        self._zap = (
            not self._custom and len(self._baseline.memory) >= ZAP_MIN_BYTES and first.can_zap(self._baseline)
        )
        first.use_zap(self._zap)
        self._idle.put(first)
        self._count = 1
        try:
            for _ in range(limits.max_instances - 1):
                self._idle.put(self._fresh())
                self._count += 1
        except RuntimeFault as fault:
            self.close()
            raise ModuleRejected(f"module failed to start: {fault.kind}: {fault.message}") from fault
        self._load_ends = None  # from here on each start function gets the whole timeout

    # --- public API ---

    def functions(self) -> list[str]:
        return list(self.module.functions)

    def invoke(
        self, function: str, payload: bytes | bytearray | memoryview, timeout_s: float | None = None
    ) -> bytes:
        """Run `function(payload)` on a warm instance. Blocking; raises RuntimeFault subclasses."""
        if function not in self._functions:
            raise NotFound(
                f"function {function!r} is not exported by this tenant's module", function=function
            )
        if timeout_s is None:
            ticks, wait = self._ticks, self.limits.timeout_s
        else:
            ticks, wait = self.engine.ticks_for(timeout_s), timeout_s
        try:
            inst = self._idle.get_nowait()
        except queue.Empty:
            try:
                inst = self._idle.get(timeout=wait)
            except queue.Empty:
                raise DeadlineExceeded(f"no warm instance became free within {wait} s") from None
        if inst is None:
            self._idle.put(None)  # wake the next waiter too
            raise TenantNotReady("the tenant's instance pool is closed")
        if type(payload) is not bytes:
            payload = bytes(payload)
        ticks = self.engine.guest_runs(ticks, inst)
        set_deadline(wait)  # host work for this guest (CPU kernels) checks the same deadline
        try:
            out = inst.call(inst.funcs[function], payload, ticks)
        except BaseException:
            self._replace(inst)
            raise
        finally:
            set_deadline(None)
            inst.host.flush()
        if inst.reset():
            self._idle.put(inst)
        else:
            self._replace(inst)
        return out

    @contextlib.contextmanager
    def quiesce(self) -> Iterator[None]:
        """Block new invokes and wait for in-flight ones; reentrant within one thread."""
        me = threading.get_ident()
        if self._owner == me:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        with self._barrier:
            held: list[WarmInstance] = []
            try:
                with self._lock:
                    count = self._count
                while len(held) < count:
                    inst = self._idle.get()
                    if inst is None:  # closed meanwhile
                        self._idle.put(None)
                        break
                    held.append(inst)
                self._owner, self._depth = me, 1
                self._held = held
                yield
            finally:
                self._owner, self._depth = None, 0
                for inst in self._held:
                    self._idle.put(inst)
                self._held = []

    def capture_state(self) -> WasmState:
        """Linear memory + mutable exported globals every invoke starts from (bit-exact)."""
        with self.quiesce(), self._lock:
            return WasmState(memory=self._baseline.memory, globals=list(self._baseline.globals))

    def restore_state(self, state: WasmState) -> None:
        """Make `state` the baseline of every instance (memory grown as needed). All or nothing.

        The held instances are loaded in place (a memcpy and the globals each): spawning a fresh
        instance per slot cost 0.3-1 ms apiece. Only an instance whose memory is already larger than
        the new baseline (memory cannot shrink) is replaced by a fresh one. On any failure every
        touched instance is put back to the old baseline (or replaced from it) before re-raising.
        """
        baseline = self._validate(state)
        with self.quiesce(), self._lock:
            held = self._held
            done: list[int] = []
            try:
                for i, inst in enumerate(held):
                    done.append(i)
                    inst.use_zap(False)  # reset must copy the new baseline, not drop to the module's image
                    if not inst.adopt(baseline, write=True):
                        fresh = self._spawn()
                        if not fresh.adopt(baseline, write=True):
                            fresh.close()
                            raise SnapshotRejected(
                                "baseline memory is smaller than the module's initial memory"
                            )
                        inst.close()
                        held[i] = fresh
            except BaseException:
                self._roll_back(held, done)
                raise
            self._baseline, self._custom, self._zap = baseline, True, False

    def _roll_back(self, held: list[WarmInstance], touched: list[int]) -> None:
        """Put instances `touched` of `held` back to the current (old) baseline; replace those that cannot."""
        zap = self._zap and not self._custom
        for i in touched:
            inst = held[i]
            try:
                inst.use_zap(False)
                if inst.adopt(self._baseline, write=True):
                    inst.use_zap(zap)
                    continue
            except RuntimeFault:
                pass
            inst.close()
            held[i] = self._fresh()  # raises only if the old baseline itself cannot start: pool is broken

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        while True:
            try:
                inst = self._idle.get_nowait()
            except queue.Empty:
                break
            if inst is not None:
                inst.close()
        self._idle.put(None)

    # --- internals ---

    def _load_ticks(self) -> int:
        """Deadline ticks for guest code now: what is left of the load's deadline while loading."""
        if self._load_ends is None:
            return self._ticks
        left = self._load_ends - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(
                f"loading ran past the tenant's {self.limits.timeout_s} s deadline "
                "(start functions and tw_init share it)"
            )
        return self.engine.ticks_for(left)

    def _spawn(self) -> WarmInstance:
        ticks = self._load_ticks() if self.module.has_start else self._ticks
        inst = WarmInstance(
            self.engine, self.module, self.limits, self.device, self.tenant_id, self.budget, ticks
        )
        metrics.INSTANCE_SPAWNS.labels(tenant=self.tenant_id).inc()
        return inst

    def _fresh(self) -> WarmInstance:
        inst = self._spawn()
        if not inst.adopt(self._baseline, write=self._custom):
            inst.close()
            raise SnapshotRejected("baseline memory is smaller than the module's initial memory")
        inst.use_zap(self._zap and not self._custom)
        return inst

    def _replace(self, inst: WarmInstance) -> None:
        inst.close()
        if self._closed:
            return
        try:
            with self._lock:
                self._idle.put(self._fresh())
        except Exception:
            with self._lock:
                self._count -= 1
            log.exception("Failed to replace a wasm instance tenant=%s", self.tenant_id)

    def _validate(self, state: WasmState) -> Baseline:
        memory = bytes(state.memory)
        if len(memory) % WASM_PAGE or len(memory) < self.module.min_memory_bytes:
            raise SnapshotRejected(
                f"linear memory of {len(memory)} bytes is not a whole number of pages of at least "
                f"{self.module.min_memory_bytes} bytes"
            )
        if len(memory) > self.limits.memory_bytes:
            raise SnapshotRejected(
                f"linear memory of {len(memory)} bytes is over the tenant's "
                f"{self.limits.memory_bytes} byte limit"
            )
        want = [(n, vt) for n, vt, _ in self._baseline.globals]
        got = [(n, vt) for n, vt, _ in state.globals]
        if sorted(want) != sorted(got):
            raise SnapshotRejected(f"globals {got} do not match this module's mutable globals {want}")
        values = {n: v for n, _, v in state.globals}
        ordered = []
        for name, vt in want:
            v = values[name]
            ok = isinstance(v, int) if vt in ("i32", "i64") else isinstance(v, int | float)
            if not ok:
                raise SnapshotRejected(f"global {name!r} of type {vt} has a bad value {v!r}")
            ordered.append((name, vt, float(v) if vt in ("f32", "f64") else v))
        return Baseline(memory, ordered)
