"""Guest ABI v1's optional streaming import, `tensorwasm.stream_write` (issue 14).

Owns the host function. It writes to the sink of the worker thread's current `GuestRun`
(tenancy/runs.py); the sink's `write` may block (bounded) and raises a `RuntimeFault` when the run
must stop, and so does a cancelled run: the host function then raises `StopGuest`, which the
trampoline (hostcalls.py) turns into a trap carrying that fault, so a guest that ignores error
codes still stops at its next write. Outside a run with a sink (a plain invoke) it answers
`E_NO_STREAM` and the guest goes on. Must not import the HTTP layer, asyncio or the accelerator.
"""

from __future__ import annotations

from typing import Any

from tensorwasm.runtime.engine import abi
from tensorwasm.runtime.errors import BadRequest, Cancelled, RuntimeFault
from tensorwasm.runtime.tenancy.runs import StopGuest, current

__all__ = ["StopGuest", "stream_write"]
_U32 = 0xFFFF_FFFF


def stream_write(g: Any, v: Any) -> int:
    """(ptr, len) -> 0 | E_NO_STREAM | E_INVALID: hand one chunk of output to the caller now."""
    run = current()
    if run is None or run.sink is None:
        return abi.E_NO_STREAM
    if run.cancelled:
        raise StopGuest(Cancelled(run.cancel_reason or "the run was cancelled"))
    n = v[2] & _U32
    if n > abi.MAX_STREAM_CHUNK:
        raise BadRequest(f"stream chunk of {n} bytes is over the {abi.MAX_STREAM_CHUNK}-byte limit")
    if not n:
        return abi.OK
    data = bytes(g.view(v[0] & _U32, n))
    try:
        run.sink.write(data)
    except RuntimeFault as fault:
        raise StopGuest(fault) from None
    run.chunks += 1
    return abi.OK
