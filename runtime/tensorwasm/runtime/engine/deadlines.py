"""The epoch deadline callback of every warm instance's store: deadlines in slices, and cancellation.

Owns `watch` and the callback it installs (wasmtime's public C API,
`wasmtime_store_epoch_deadline_callback`). Why a callback: a running guest's deadline cannot be
moved from another thread. Its compiled code keeps the store's deadline in a register and re-reads
it only when the engine epoch passes it (or on a function entry), and wasmtime's Store is not Sync
(setting it while a guest runs is a data race on a `&mut Store`), so DELETE of a job could not stop
a guest that loops without calling the host until its whole timeout had passed. Instead each call's
store deadline is at most `EpochTicker.slice_ticks` ahead (50 ms); when the epoch reaches it wasmtime
calls `_on_deadline` on the guest's own thread, which stops the guest with `cancelled` if the
thread's current GuestRun (tenancy/runs.py) was cancelled, with `deadline_exceeded` if the
invoke's real deadline (the epoch `EpochTicker.guest_runs` published) has passed, and otherwise
lets it run one more slice. Nothing another thread does touches the store, and a neighbour's guest
never notices: the engine's epoch advances as before. A call shorter than a slice never calls back.
Start functions run before `watch`: their deadline traps as it always did.
The callback's verdict goes into the instance's GuestContext.fault (what `invoke` raises); the
error it hands wasmtime only unwinds the guest. Only engine/ imports this module.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import weakref
from collections.abc import Callable
from typing import Any

from tensorwasm.runtime.engine import lowlevel
from tensorwasm.runtime.engine.ticker import EpochTicker
from tensorwasm.runtime.errors import Cancelled, DeadlineExceeded, RuntimeFault
from tensorwasm.runtime.tenancy.runs import current

log = logging.getLogger(__name__)

UNSLICED = 1 << 62  # what `watch` answers when the callback could not be installed: whole deadlines

# Callback key (the `data` pointer wasmtime hands back) -> (the instance, weakly; its engine's ticker).
_WATCHED: dict[int, tuple[weakref.ref[Any], EpochTicker]] = {}
_keys = itertools.count(1)
_U64 = ctypes.c_uint64


def watch(store: Any, instance: Any, ticker: EpochTicker) -> int:
    """Install the deadline callback on `store` (the wasmtime.Store `instance` runs in; it has `host`,
    a GuestContext, and is tracked by `ticker`). Returns the most ticks a call may set as its store
    deadline: `ticker.slice_ticks`, or UNSLICED when wasmtime's C API is not reachable (the call then
    sets its whole deadline and a cancel is noticed at the next stream_write or at that deadline)."""
    key = next(_keys)
    try:
        ptr = lowlevel.pointer_value(store.ptr())
        _WATCHED[key] = (weakref.ref(instance, _forget(key)), ticker)
        lowlevel.store_epoch_deadline_callback(ptr, _CALLBACK_ADDRESS, key, None)
    except Exception as exc:  # no library or a C API name gone upstream (lowlevel's public layer)
        _WATCHED.pop(key, None)
        log.warning("Failed installing the epoch deadline callback (cancel waits for deadlines): %s", exc)
        return UNSLICED
    return ticker.slice_ticks


def _forget(key: int) -> Callable[[weakref.ref[Any]], None]:
    def gone(_ref: weakref.ref[Any]) -> None:
        _WATCHED.pop(key, None)

    return gone


def watched() -> int:
    """Instances with a callback installed now (tests: none is kept alive by this module)."""
    return len(_WATCHED)


def _on_deadline(_ctx: int | None, key: int | None, delta: int | None, _kind: int | None) -> int:
    """wasmtime: the store's epoch deadline has passed. 0 with *delta set: go on; an error: stop."""
    try:
        entry = _WATCHED.get(key or 0)
        instance = entry[0]() if entry is not None else None
        if entry is None or instance is None or not delta:
            return _stop(None, "a guest ran in a store that no instance watches")
        ticker = entry[1]
        run = current()
        fault: RuntimeFault
        if run is not None and run.cancelled:
            fault = Cancelled(run.cancel_reason or "the run was cancelled")
        else:
            left = ticker.ticks_left(instance)
            if left > 0:
                _U64.from_address(delta).value = min(left, ticker.slice_ticks)
                return 0
            fault = DeadlineExceeded("the invoke ran past its deadline and was interrupted")
        return _stop(instance, fault.kind, fault)
    except BaseException as exc:  # never unwind through wasm frames: stop the guest instead
        log.exception("Failed in the epoch deadline callback")
        return _stop(None, f"deadline callback failed: {type(exc).__name__}")


def _stop(instance: Any, why: str, fault: RuntimeFault | None = None) -> int:
    if instance is not None and fault is not None:
        instance.host.fault = fault  # what the invoke raises; the error below only unwinds the guest
    return int(lowlevel.error_new(f"tensorwasm stopped the guest: {why}".encode()) or 0)


_CALLBACK = lowlevel.EpochDeadlineCallback(_on_deadline)  # module-lifetime: stores point at it
_CALLBACK_ADDRESS = ctypes.cast(_CALLBACK, ctypes.c_void_p).value
