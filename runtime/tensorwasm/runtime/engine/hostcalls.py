"""Host side of guest ABI v1: the `tensorwasm.*` imports a guest can call.

Owns the host functions (log, last error, GPU buffers by opaque handle, kernel launch, sync) and the
per-instance `GuestContext` they act on. Host calls never trap: a failure returns a negative code,
sets the instance's last error, and keeps the structured fault so that `invoke` can raise it when
the guest then gives up. The accelerator is reached only through the `TenantDevice` protocol.
Must not import the HTTP layer; imports accel lazily (only its pure `base` module).
"""

from __future__ import annotations

import ctypes
import logging
import struct
from collections.abc import Callable
from typing import Any

import wasmtime

from tensorwasm.runtime import metrics
from tensorwasm.runtime.engine import abi, lowlevel, streaming
from tensorwasm.runtime.engine.budget import TenantBudget
from tensorwasm.runtime.errors import (
    AcceleratorFailed,
    BadRequest,
    GpuMemoryExhausted,
    GuestLimitExceeded,
    GuestTrap,
    InvalidKernelLaunch,
    NotFound,
    RuntimeFault,
)

log = logging.getLogger("tensorwasm.guest")


class _NoDevice(BadRequest):
    """The pool was created without a TenantDevice."""


_CODES: tuple[tuple[type[RuntimeFault], int], ...] = (
    (_NoDevice, abi.E_NO_DEVICE),
    (GpuMemoryExhausted, abi.E_GPU_MEMORY),
    (InvalidKernelLaunch, abi.E_LAUNCH),
    (AcceleratorFailed, abi.E_ACCELERATOR),
    (NotFound, abi.E_NOT_FOUND),
    (BadRequest, abi.E_INVALID),
    (GuestTrap, abi.E_INVALID),
)
_LOG_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}
_LOG_BYTES_PER_TOKEN = 128
_CONTROL = {c: "." for c in (*range(32), 127)}
_U32 = 0xFFFF_FFFF


class GuestContext:
    """What host calls of one instance need: its store, memory, device, error state and budgets.

    `calls_left` and `log_left` are this invoke's remaining host calls and log bytes (`begin`
    refills them); `budget` holds the tenant's per-second rates, shared by its instances.
    """

    __slots__ = (
        "base",
        "budget",
        "calls_left",
        "calls_per_invoke",
        "ctx",
        "device",
        "dropped",
        "dropped_logs",
        "fault",
        "last_error",
        "ll",
        "log_left",
        "log_per_invoke",
        "mem",
        "tenant_id",
    )

    def __init__(
        self,
        ctx: int,
        mem: int,
        base: int,
        device: Any,
        tenant_id: str,
        budget: TenantBudget | None = None,
        calls_per_invoke: int = 1 << 62,
        log_per_invoke: int = abi.MAX_LOG_BYTES << 20,
        ll: Any = lowlevel.PRIVATE,
    ) -> None:
        self.ctx, self.mem, self.base, self.ll = ctx, mem, base, ll
        self.device, self.tenant_id = device, tenant_id
        self.last_error = ""
        self.fault: RuntimeFault | None = None
        self.budget = budget
        self.calls_per_invoke, self.log_per_invoke = calls_per_invoke, log_per_invoke
        self.calls_left, self.log_left = calls_per_invoke, log_per_invoke
        self.dropped_logs = metrics.GUEST_LOG_LINES_DROPPED.labels(tenant=tenant_id)
        self.dropped = 0  # dropped lines not yet in the metric (a spamming guest drops thousands)

    def begin(self) -> None:
        """A new guest run (invoke or tw_init): fresh error state and per-invoke budgets."""
        self.fault = None
        self.calls_left, self.log_left = self.calls_per_invoke, self.log_per_invoke
        self.flush()

    def flush(self) -> None:
        """Counts of the guest run that just ended into the metrics (one locked update, not one per line)."""
        if self.dropped:
            self.dropped_logs.inc(self.dropped)
            self.dropped = 0

    def view(self, ptr: int, nbytes: int) -> memoryview:
        """A zero-copy view of guest memory [ptr, ptr + nbytes), bounds-checked."""
        size = self.ll.memory_data_size(self.ctx, self.mem)
        if ptr < 0 or nbytes < 0 or ptr + nbytes > size:
            raise GuestTrap(f"guest range ptr={ptr} len={nbytes} is outside linear memory of {size} bytes")
        return memoryview((ctypes.c_char * nbytes).from_address(self.base + ptr)).cast("B")

    def fail(self, fault: RuntimeFault) -> int:
        self.fault = fault
        self.last_error = f"{fault.kind}: {fault.message}"
        for cls, code in _CODES:
            if isinstance(fault, cls):
                return code
        return abi.E_INTERNAL

    def require_device(self) -> Any:
        if self.device is None:
            raise _NoDevice(f"tenant {self.tenant_id!r} has no GPU access")
        return self.device


# Store context address -> GuestContext, so one linker serves every store of the engine.
_CONTEXTS: dict[int, GuestContext] = {}


def register(g: GuestContext) -> None:
    _CONTEXTS[g.ctx] = g


def unregister(g: GuestContext) -> None:
    g.flush()
    if _CONTEXTS.get(g.ctx) is g:
        del _CONTEXTS[g.ctx]


# --- the host functions: (GuestContext, raw slots) -> result or None ---
# Slot i of `v` is param i (int64 view of a 16-byte ValRaw); the result goes into slot 0.


def _log(g: GuestContext, v: Any) -> None:
    level = _LOG_LEVELS.get(v[0] & _U32, logging.INFO)
    n = min(v[4] & _U32, abi.MAX_LOG_BYTES)
    # Per invoke, then per second: a guest that spams its log loses lines, counted, never the disk.
    # A dropped line costs as little as possible (it never touches guest memory): it holds the GIL.
    if n > g.log_left or (g.budget is not None and not g.budget.log_allowed(n)):
        g.dropped += 1
        return
    g.log_left -= n
    if g.budget is not None and n >= _LOG_BYTES_PER_TOKEN:
        g.budget.host_call(n // _LOG_BYTES_PER_TOKEN)  # a line costs host-call tokens by its size
    view = g.view(v[2] & _U32, n)
    if not log.isEnabledFor(level):
        return
    # Control characters become "." (no forged log lines, no 4x escaping): the line written is
    # about as long as the budget charged for it.
    text = bytes(view).decode("utf-8", "replace").translate(_CONTROL)
    log.log(level, "Guest logged tenant=%s message=%s", g.tenant_id, text)


def _last_error(g: GuestContext, v: Any) -> int:
    msg = g.last_error.encode()
    cap = v[2] & _U32
    if cap:
        n = min(cap, len(msg))
        g.view(v[0] & _U32, n)[:] = msg[:n]
    return len(msg)


def _gpu_alloc(g: GuestContext, v: Any) -> int:
    return int(g.require_device().alloc(int(v[0])))


def _gpu_free(g: GuestContext, v: Any) -> int:
    g.require_device().free(int(v[0]))
    return abi.OK


def _gpu_write(g: GuestContext, v: Any) -> int:
    dev = g.require_device()
    dev.write(int(v[0]), int(v[2]), g.view(v[4] & _U32, v[6] & _U32))
    return abi.OK


def _gpu_read(g: GuestContext, v: Any) -> int:
    dev = g.require_device()
    dev.read_into(int(v[0]), int(v[2]), g.view(v[4] & _U32, v[6] & _U32))
    return abi.OK


def _gpu_launch(g: GuestContext, v: Any) -> int:
    from tensorwasm.runtime.accel.base import KernelArg

    dev = g.require_device()
    name_len, nargs = v[2] & _U32, v[8] & _U32
    if name_len > abi.MAX_KERNEL_NAME:
        raise InvalidKernelLaunch(f"kernel name of {name_len} bytes is over {abi.MAX_KERNEL_NAME}")
    if nargs > abi.MAX_KERNEL_ARGS:
        raise InvalidKernelLaunch(f"{nargs} kernel arguments is over the limit of {abi.MAX_KERNEL_ARGS}")
    try:
        name = bytes(g.view(v[0] & _U32, name_len)).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidKernelLaunch("kernel name is not valid UTF-8") from None
    dims = struct.unpack("<6I", g.view(v[4] & _U32, 24))
    args = []
    for i, (kind, _pad, raw) in enumerate(
        struct.iter_unpack("<II8s", g.view(v[6] & _U32, nargs * abi.ARG_RECORD_BYTES))
    ):
        kname = abi.ARG_KINDS.get(kind)
        if kname is None:
            raise InvalidKernelLaunch(f"kernel argument {i} has unknown kind code {kind}")
        args.append(KernelArg(kname, _decode_arg(kname, raw)))  # type: ignore[arg-type]
    dev.launch(name, dims[:3], dims[3:], args, v[10] & _U32)
    return abi.OK


def _decode_arg(kind: str, raw: bytes) -> int | float:
    if kind == "f32":
        return float(struct.unpack_from("<f", raw)[0])
    if kind == "f64":
        return float(struct.unpack_from("<d", raw)[0])
    fmt = {"buffer": "<q", "i32": "<i", "u32": "<I", "i64": "<q", "u64": "<Q"}[kind]
    return int(struct.unpack_from(fmt, raw)[0])


def _gpu_sync(g: GuestContext, v: Any) -> int:
    g.require_device().sync()
    return abi.OK


_IMPLS: dict[str, Callable[[GuestContext, Any], int | None]] = {
    "log": _log,
    "last_error": _last_error,
    "gpu_alloc": _gpu_alloc,
    "gpu_free": _gpu_free,
    "gpu_write": _gpu_write,
    "gpu_read": _gpu_read,
    "gpu_launch": _gpu_launch,
    "gpu_sync": _gpu_sync,
    "stream_write": streaming.stream_write,  # engine/streaming.py (issue 14)
}
assert set(_IMPLS) == set(abi.HOST_FUNCTIONS)

# The int64 view of a call's ValRaw slots (16 bytes each) by slot count, built once: making the
# array type on every host call cost about a tenth of the call.
_SLOTS = {
    n: ctypes.c_int64 * (2 * max(n, 1))
    for n in range(1 + max(max(len(p), len(r)) for p, r in abi.HOST_FUNCTIONS.values()))
}


def _trampoline(name: str, impl: Callable[[GuestContext, Any], int | None], ll: Any) -> lowlevel.HostCall:
    trap_new = ll.trap_new

    def call(_env: int, caller: Any, slots: int, nslots: int) -> int:
        g = _CONTEXTS.get(ll.caller_context(caller))
        if g is None:  # cannot happen for stores we created; trap rather than guess
            msg = b"tensorwasm host call from an unknown store"
            return int(trap_new(msg, len(msg)))
        g.calls_left -= 1
        if g.calls_left < 0:
            # Over the per-invoke cap: stop the guest here (a trap), not just fail the call, so a
            # loop that ignores error codes cannot keep the host busy until its deadline.
            limit = g.calls_per_invoke
            g.fault = GuestLimitExceeded(
                f"the guest made more than {limit} host calls in one invoke",
                limit="hostCallsPerInvoke",
                value=limit,
            )
            msg = b"tensorwasm host call budget exhausted"
            return int(trap_new(msg, len(msg)))
        if g.budget is not None:
            g.budget.host_call()  # may wait: charged to this invoke's deadline
        v = _SLOTS[nslots].from_address(slots)
        try:
            result = impl(g, v)
        except streaming.StopGuest as stop:  # a cancelled or stalled stream: the guest stops here
            g.fault = stop.fault
            msg = b"tensorwasm run stopped"
            return int(trap_new(msg, len(msg)))
        except RuntimeFault as fault:
            result = g.fail(fault)
        except Exception as exc:  # a host bug must not unwind through wasm frames
            log.exception("Host call failed tenant=%s call=%s", g.tenant_id, name)
            result = g.fail(GuestTrap(f"host call {name} failed: {type(exc).__name__}: {exc}"))
        if result is not None and abi.HOST_FUNCTIONS[name][1]:
            v[0] = result
        return 0

    return call


def define_all(linker: wasmtime.Linker, ll: Any = lowlevel.PRIVATE) -> None:
    """Define every ABI v1 host function on `linker` (once per engine), through the API layer `ll`."""
    for name, (params, results) in abi.HOST_FUNCTIONS.items():
        ty = wasmtime.FuncType(
            [getattr(wasmtime.ValType, p)() for p in params],
            [getattr(wasmtime.ValType, r)() for r in results],
        )
        ll.define_host_func(linker, abi.HOST_MODULE, name, ty, _trampoline(name, _IMPLS[name], ll))
