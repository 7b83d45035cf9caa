"""Per-tenant admission: max concurrency, a bounded queue, and the worker threads that run invokes.

Owns `TenantQueue`. One tenant's invokes run on that tenant's own worker threads (at most
`max_concurrency` of them), so a runaway guest can only ever hold its own tenant's slots; at most
`queue_length` more wait, and anything beyond is refused at once with `QueueFull(retry_after_s)`.
This is also the thread hop that keeps blocking wasm/CUDA work off the event loop: one SimpleQueue
put per invoke, no concurrent.futures machinery, and results come back through a deque that the
loop drains in one callback, so under load many results share one loop wake-up.
`submit` and every counter are touched on the event-loop thread only; workers hand results back.

CPU isolation: a worker whose guest misbehaved (deadline, trap, memory limit) lowers its own CPU
weight (nice +10, per thread on Linux), so a runaway tenant burning a core yields to its
neighbours and to the event loop; the next clean call restores it (or, where raising priority is
not permitted, the demoted thread retires and a fresh one is started at normal priority). It also
backs off before its next job (doubling per consecutive failure, capped): a guest that traps in
a tight loop costs the process page faults and instance rebuilds, and it should pay that in its
own throughput, never in its neighbours' latency.
Must not import wasmtime, cuda or aiohttp.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from time import perf_counter
from typing import Any, NoReturn

from tensorwasm.runtime import metrics
from tensorwasm.runtime.errors import DeadlineExceeded, GuestMemoryExceeded, GuestTrap, QueueFull

# Start the service-time estimate at 10 ms so the first Retry-After is not zero.
_INITIAL_SERVICE_S = 0.010
_EWMA_WEIGHT = 0.1

_MISBEHAVED = (DeadlineExceeded, GuestTrap, GuestMemoryExceeded)
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.005, 0.25
DEMOTED_NICE = 10
# Experiment (issue 16, off by default): after handing a short job to a worker, the event-loop thread
# waits for its result for up to this long, yielding the GIL, instead of going back to its poller;
# a loop thread that went idle costs a wake-up (in a VM, a halted vCPU's) when the result arrives.
# Only while the tenant's jobs have been short and nothing else is pending on the loop.
_SPIN_S = int(os.environ.get("TENSORWASM_RUNTIME_QUEUE_SPIN_US", "0") or 0) / 1e6

# A job carries when it was admitted; a finished one how long it waited for a worker.
Job = tuple[Callable[[Any, Any], Any], Any, Any, "asyncio.Future[Any]", float]
Finished = tuple["asyncio.Future[Any]", Any, BaseException | None, float, bool, float]


class TenantQueue:
    """Bounded admission plus a private worker pool for one tenant (event-loop side API)."""

    def __init__(
        self,
        tenant: str,
        max_concurrency: int,
        queue_length: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        if max_concurrency < 1 or queue_length < 0:
            raise ValueError("max_concurrency must be >= 1 and queue_length >= 0")
        self.tenant = tenant
        self.max_concurrency = max_concurrency
        self.queue_length = queue_length
        self._capacity = max_concurrency + queue_length
        self._loop = loop
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._outstanding = 0  # admitted and not yet finished (running + waiting)
        self._service_s = _INITIAL_SERVICE_S
        self._idle: asyncio.Future[None] | None = None
        self._finished: collections.deque[Finished] = collections.deque()
        self._drain_scheduled = False
        self._closed = False
        self.rejected = 0

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def in_flight(self) -> int:
        return min(self._outstanding, self.max_concurrency)

    @property
    def capacity(self) -> int:
        """Invokes admitted at once (running + waiting); the next one is refused."""
        return self._capacity

    @property
    def depth(self) -> int:
        """Invokes admitted but waiting for a worker."""
        return max(0, self._outstanding - self.max_concurrency)

    def retry_after_s(self) -> float:
        """When a slot is likely free again: the queue ahead drained at the observed service rate."""
        return (self.depth + 1) * self._service_s / self.max_concurrency

    def submit(
        self, fn: Callable[[Any, Any], Any], a: Any, b: Any, reserved: bool = False
    ) -> asyncio.Future[Any]:
        """Run `fn(a, b)` on a worker thread; raises QueueFull when the tenant is at capacity.

        With `reserved`, the slot was taken by `reserve()` already (admission before the request
        body was read) and this cannot refuse, unless the queue was closed meanwhile.
        """
        if not reserved:
            self.reserve()
        elif self._closed:
            self._outstanding -= 1
            self._refuse()
        if len(self._workers) < self._outstanding and len(self._workers) < self.max_concurrency:
            self._spawn()
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._jobs.put((fn, a, b, fut, perf_counter()))
        if _SPIN_S and self._service_s < _SPIN_S and not getattr(self._loop, "_ready", None):
            self._spin(fut)
        return fut

    def _spin(self, fut: asyncio.Future[Any]) -> None:
        until = perf_counter() + _SPIN_S
        sleep0 = time.sleep
        while perf_counter() < until:
            if self._finished:
                self._collect()
                if fut.done():
                    return
            sleep0(0)

    def reserve(self) -> None:
        """Take a slot now (raises QueueFull); hand it to `submit(..., reserved=True)` or `unreserve()`."""
        if self._outstanding >= self._capacity or self._closed:
            self._refuse()
        self._outstanding += 1

    def unreserve(self) -> None:
        """Give back a slot `reserve()` took without submitting (the body never arrived)."""
        self._outstanding -= 1
        if not self._outstanding and self._idle is not None:
            self._idle.set_result(None)
            self._idle = None

    def _refuse(self) -> NoReturn:
        self.rejected += 1
        retry = self.retry_after_s()
        raise QueueFull(
            f"tenant {self.tenant} has {self.in_flight} invokes running and {self.depth} queued",
            retry_after_s=round(max(retry, 0.001), 3),
            max_concurrency=self.max_concurrency,
            queue_length=self.queue_length,
        )

    async def drain(self) -> None:
        """Wait until every admitted invoke has finished (new ones may still be admitted)."""
        while self._outstanding:
            if self._idle is None:
                self._idle = self._loop.create_future()
            await asyncio.shield(self._idle)

    def close(self) -> None:
        """Refuse new work and let the workers exit once the queue ahead of them is done."""
        self._closed = True
        for _ in self._workers:
            self._jobs.put(None)
        self._workers.clear()

    def _spawn(self) -> None:
        t = threading.Thread(
            target=self._work, name=f"invoke-{self.tenant}-{len(self._workers)}", daemon=True
        )
        self._workers.append(t)
        t.start()

    def _work(self) -> None:
        get, finished, wake = self._jobs.get, self._finished.append, self._loop.call_soon_threadsafe
        collect = self._collect
        demoted = False
        backoff = 0.0
        while True:
            job = get()
            if job is None:
                return
            fn, a, b, fut, admitted = job
            error: BaseException | None = None
            start = perf_counter()
            waited = start - admitted
            try:
                # A request cancelled while queued (client gone) does not get run.
                result = None if fut.cancelled() else fn(a, b)
            except BaseException as exc:  # handed to the awaiting request, never lost
                result, error = None, exc
            took = perf_counter() - start
            retire = False
            if isinstance(error, _MISBEHAVED):
                demoted = demoted or _set_demoted(True)
                backoff = min(max(2 * backoff, _BACKOFF_FIRST_S), _BACKOFF_MAX_S)
            elif error is None:
                backoff = 0.0
                if demoted:
                    demoted = not _set_demoted(False)
                    retire = demoted  # could not raise it back: hand the slot to a fresh thread
            finished((fut, result, error, took, retire, waited))
            if not self._drain_scheduled:  # one wake-up for however many results pile up meanwhile
                self._drain_scheduled = True
                try:
                    wake(collect)
                except RuntimeError:  # the loop is closed: the process is shutting down
                    return
            if retire:
                return
            if backoff:
                time.sleep(backoff)

    def _collect(self) -> None:
        # Clear the flag before draining: a result appended after this point schedules a new drain.
        self._drain_scheduled = False
        finished, done = self._finished, self._done
        while finished:
            done(*finished.popleft())

    def _done(
        self,
        fut: asyncio.Future[Any],
        result: Any,
        error: BaseException | None,
        took: float,
        retired: bool,
        waited: float,
    ) -> None:
        self._outstanding -= 1
        metrics.QUEUE_WAIT.record(waited)
        if retired and not self._closed:
            self._workers.pop()  # any one: workers are interchangeable, the count is what matters
            if len(self._workers) < min(self._outstanding, self.max_concurrency):
                self._spawn()
        self._service_s += _EWMA_WEIGHT * (took - self._service_s)
        if not fut.done():  # a client that went away cancelled it; the slot is freed all the same
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)
        if not self._outstanding and self._idle is not None:
            self._idle.set_result(None)
            self._idle = None


def _set_demoted(demote: bool) -> bool:
    """Lower this thread's CPU weight (nice +10, about a tenth of a normal thread's share) or restore it.

    Linux applies nice per thread. Not SCHED_IDLE: a worker holds the GIL for a few microseconds
    around each guest call, and a thread that can be starved outright while holding it would stall
    the event loop (priority inversion); a tenth of a share keeps that wait short.
    False where not permitted or not supported.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DEMOTED_NICE if demote else 0)
    except (OSError, AttributeError):
        return False
    return True


def retry_after_header(seconds: float) -> str:
    """Retry-After carries whole seconds; never advertise 0 (clients would hammer)."""
    return str(max(1, math.ceil(seconds)))
