"""Guest ABI v1's optional streaming import, `tensorwasm.stream_write`, and the run it writes to.

Owns `GuestRun` (one run's side channel: a cancel flag, an optional sink for streamed chunks, when
it started) and the host function. A worker thread enters a run with `GuestRun.call`, which makes
it the thread's current run for the guest's host calls (guest code and its host calls run on that
one thread), so the plain invoke path pays nothing for it. The sink is the HTTP layer's (a bounded
buffer, api/streams.py) or an async job's collector (api/jobs.py): its `write` may block (bounded)
and raises a `RuntimeFault` when the run must stop; the host function then raises `StopGuest`,
which the trampoline turns into a trap carrying that fault, so a guest that ignores error codes
still stops at its next write. A run without a sink answers `E_NO_STREAM` and the guest goes on.
Must not import the HTTP layer, asyncio or the accelerator.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from tensorwasm.runtime.engine import abi
from tensorwasm.runtime.errors import BadRequest, Cancelled, RuntimeFault

_U32 = 0xFFFF_FFFF
_local = threading.local()


class StreamSink(Protocol):
    def write(self, data: bytes) -> None:
        """Take one chunk (may block, bounded); raise a RuntimeFault to stop the guest."""


class StopGuest(Exception):
    """Raised by a host function to trap the guest with `fault` as the invoke's error."""

    def __init__(self, fault: RuntimeFault) -> None:
        super().__init__(fault.message)
        self.fault = fault


class GuestRun:
    """One invoke's cancel flag and stream sink; `call` runs it on the current (worker) thread."""

    __slots__ = ("cancel_reason", "cancelled", "chunks", "sink", "started")

    def __init__(self, sink: StreamSink | None = None) -> None:
        self.sink = sink
        self.cancelled = False  # set from the event loop; read by the guest's next stream_write
        self.cancel_reason = ""
        self.started: float | None = None  # monotonic, set by the worker when the guest starts
        self.chunks = 0

    def cancel(self, reason: str) -> None:
        self.cancel_reason = reason
        self.cancelled = True

    def call(self, target: tuple[Callable[[str, bytes], bytes], str], payload: bytes) -> bytes:
        """`invoke(function, payload)` with this run current (the TenantQueue worker's fn(a, b))."""
        if self.cancelled:  # cancelled while it waited in the queue: never starts
            raise Cancelled(self.cancel_reason or "cancelled before it started")
        invoke, function = target
        _local.run = self
        self.started = time.monotonic()
        try:
            return invoke(function, payload)
        finally:
            _local.run = None


def stream_write(g: Any, v: Any) -> int:
    """(ptr, len) -> 0 | E_NO_STREAM | E_INVALID: hand one chunk of output to the caller now."""
    run: GuestRun | None = getattr(_local, "run", None)
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
