"""One guest run's side channel: its cancel flag and where its streamed chunks go (issue 14).

Owns `GuestRun`, `StreamSink` and `StopGuest`. A worker thread enters a run with `GuestRun.call`,
which makes it the thread's current run (`current()`) for the guest's host calls: guest code and
its host calls run on that one thread, so the plain invoke path, which never enters a run, pays
nothing for it. The sink is the HTTP layer's bounded stream buffer (api/streams.py) or an async
job's collector (api/jobs.py); engine/streaming.py is the host function that writes to it.
Pure (threading only): must not import wasmtime, cuda, asyncio or aiohttp.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from tensorwasm.runtime.errors import Cancelled, RuntimeFault

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


def current() -> GuestRun | None:
    """The run the calling (worker) thread is in, if any."""
    run: GuestRun | None = getattr(_local, "run", None)
    return run
