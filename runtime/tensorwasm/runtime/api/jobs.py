"""Async invocations: the per-tenant job table behind `POST .../invoke?mode=async` and /v1/jobs.

Owns `JobBoard` (every tenant's jobs, event-loop thread only), `Job` and `JobOutput` (the sink
that collects what an async guest streams with `stream_write`). A job is an ordinary invoke on the
tenant's own queue and worker threads, under the tenant's deadline; the HTTP request that made it
returns at once, so a client that goes away loses nothing. Bounds, all per tenant: at most
`per_tenant` jobs held (any state; the next one is 429 jobs_full with Retry-After until the first
finished one expires), at most `output_bytes_per_tenant` of finished outputs held (a job whose
output would pass it fails with guest_limit_exceeded, limit jobOutputBytes), and a finished job is
forgotten `ttl_s` after it finished. A job id is looked up only in its own tenant's table: another
tenant's id is 404, the same answer as an id that never existed.
Expiry does not wait for the tenant to call again: while the board holds any table, a tick on the
event loop (at most one a second, none while the board is empty) forgets every tenant's expired
jobs, taking only the due ones off a heap of expiries, drops emptied tables and runs `on_tick` (the
HTTP app's: forget the tables of tenants that left the shard).
Memory held for a tenant stays within its own bounds while clients read or cancel: an output being
read when its job is forgotten (DELETE, expiry) stays charged to the tenant's output budget until
the last read of it ends (`reading`), and a queued job's body is dropped from the worker queue at
cancel (`JobBody`), its share of the shard's in-flight body budget given back only then, or when
the worker's run of it ends.
Must not import wasmtime or cuda.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tensorwasm.runtime.errors import (
    Cancelled,
    GuestLimitExceeded,
    JobsFull,
    NotFound,
    RuntimeFault,
    TenantMoving,
)
from tensorwasm.runtime.tenancy.runs import GuestRun

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
JOB_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
_ACTIVE = (QUEUED, RUNNING)
# The board's tick: this often while it holds any table (expiry, departed tenants), never when empty.
TICK_S = 1.0
# The heap of expiries keeps an entry for a job forgotten early (DELETE, a departed tenant) until
# its time comes; past max(this, twice the live entries) it is rebuilt from the tables.
_HEAP_COMPACT_MIN = 1024
# call_later(delay_s, callback): the running loop's by default; tests pass their own.
Schedule = Callable[[float, Callable[[], None]], object]


@dataclass(frozen=True)
class JobLimits:
    """Defaults are documented in docs/runtime.md ("Async jobs")."""

    per_tenant: int = 256  # jobs held per tenant, any state
    ttl_s: float = 600.0  # a finished (or cancelled) job is kept this long, then forgotten
    output_bytes_per_tenant: int = 64 << 20  # outputs of finished jobs held per tenant
    # A read of a job (GET /v1/jobs/{id}[/output]) whose client takes no piece of it (at most
    # 1 MiB) for this long is closed: a reader that stops reading holds no output for ever.
    read_stall_s: float = 30.0


class JobOutput:
    """Collects an async guest's streamed chunks (worker thread), bounded by its maxOutputBytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            if self.size + len(data) > self.limit:
                raise GuestLimitExceeded(
                    f"the job streamed more than its {self.limit}-byte output limit",
                    limit="maxOutputBytes",
                    value=self.limit,
                )
            self.chunks.append(data)
            self.size += len(data)


class Job:
    __slots__ = (
        "bytes_in",
        "created",
        "created_real",
        "created_wall",
        "error",
        "expires",
        "finished",
        "function",
        "future",
        "id",
        "output",
        "pinned",
        "readers",
        "run",
        "sink",
        "state",
        "tenant",
    )

    def __init__(
        self, tenant: str, function: str, run: GuestRun, sink: JobOutput, bytes_in: int, now: float
    ) -> None:
        self.id = "job-" + secrets.token_hex(12)  # unguessable: ids are not a way to probe
        self.tenant, self.function, self.run, self.sink = tenant, function, run, sink
        self.bytes_in = bytes_in
        self.state = QUEUED
        # `now` is the board's clock (expiry); the worker stamps run.started with time.monotonic().
        self.created, self.created_real, self.created_wall = now, time.monotonic(), time.time()
        self.finished: float | None = None
        self.expires: float | None = None
        self.output: bytes | None = None
        self.error: dict[str, Any] | None = None
        self.future: asyncio.Future[Any] | None = None
        self.readers = 0  # reads of its output in flight (JobBoard.reading)
        self.pinned: _Table | None = None  # forgotten while read: its output is still charged here

    def current_state(self) -> str:
        if self.state == QUEUED and self.run.started is not None:
            return RUNNING
        return self.state

    def view(self, with_output: bool = True) -> dict[str, Any]:
        """The JSON the API answers (output base64, only once succeeded and only if asked)."""
        out: dict[str, Any] = {
            "id": self.id,
            "function": self.function,
            "state": self.current_state(),
            "createdAt": _wall(self.created_wall),
            "inputBytes": self.bytes_in,
            "location": f"/v1/jobs/{self.id}",
        }
        if self.run.started is not None:
            out["startedAt"] = _wall(self.created_wall + (self.run.started - self.created_real))
        if self.finished is not None:
            out["finishedAt"] = _wall(self.created_wall + (self.finished - self.created))
        if self.expires is not None:
            out["expiresAt"] = _wall(self.created_wall + (self.expires - self.created))
        if self.output is not None:
            out["outputBytes"] = len(self.output)
            if with_output:
                out["output"] = base64.b64encode(self.output).decode()
        if self.error is not None:
            out["error"] = self.error
        return out


class JobBody:
    """An async job's request body on its way to a worker, and its share of the shard's in-flight
    body budget: `release` (given at construction, run on the event loop) is called exactly once,
    when the body leaves memory. A cancel (`drop`, from the job future's done callback) while the
    job is still queued drops the body at once (the queue keeps only this empty holder until a
    worker pops it); once a worker has taken it (`run_job`), when that run ends."""

    __slots__ = ("_body", "_lock", "_loop", "_release", "_taken")

    def __init__(self, body: bytes, release: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        self._body: bytes | None = body
        self._release = release
        self._loop = loop
        self._lock = threading.Lock()  # a worker's take races a cancel's drop
        self._taken = False  # by a worker, or dropped: either way the body is no longer ours

    def drop(self) -> None:
        """Event loop: the job ended or was cancelled; a body no worker took leaves memory now."""
        with self._lock:
            if self._taken:
                return  # the worker that took it releases it when its run ends
            self._taken, self._body = True, None
        self._release()

    def take(self) -> bytes | None:
        """Worker thread: the body (None if it was dropped); the caller must `done()` after."""
        with self._lock:
            if self._taken:
                return None
            body, self._body, self._taken = self._body, None, True
        return body

    def done(self) -> None:
        """Worker thread: the run of a taken body ended; its charge goes back on the loop."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is going away
            self._loop.call_soon_threadsafe(self._release)


def run_job(target: tuple[GuestRun, Callable[[str, bytes], bytes], str], held: JobBody) -> bytes:
    """A worker's run of an async job (TenantQueue's fn(a, b)): `run.call(invoke, function)` on
    the body taken off `held`; a body dropped at cancel never runs."""
    run, invoke, function = target
    body = held.take()
    if body is None:
        raise Cancelled(run.cancel_reason or "the job was cancelled before it started")
    try:
        return run.call((invoke, function), body)
    finally:
        del body  # gone from this frame before the charge goes back
        held.done()


class _Table:
    __slots__ = ("jobs", "output_bytes")

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.output_bytes = 0


class JobBoard:
    """Every tenant's jobs (event-loop thread only)."""

    def __init__(
        self,
        limits: JobLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        schedule: Schedule | None = None,
    ) -> None:
        self.limits = limits or JobLimits()
        self._tables: dict[str, _Table] = {}
        self._clock = clock
        self._expiries: list[tuple[float, str, str]] = []  # heap of (expires, tenant, job id)
        self._compact_at = _HEAP_COMPACT_MIN
        self._schedule = schedule
        self._armed = False  # a tick is scheduled
        self.on_tick: Callable[[], None] | None = None  # run by every tick (the app: departed tenants)

    def admit(self, tenant: str) -> None:
        """Raise JobsFull if `tenant` holds as many jobs (or output bytes) as it may."""
        self.purge_all()  # every tenant's expired jobs: a look at the heap's top when none is due
        table = self._purged(tenant)
        lim = self.limits
        if table is None or (
            len(table.jobs) < lim.per_tenant and table.output_bytes < lim.output_bytes_per_tenant
        ):
            return
        expiries = [j.expires for j in table.jobs.values() if j.expires is not None]
        retry = max(min(expiries) - self._clock(), 0.001) if expiries else 1.0
        raise JobsFull(
            f"tenant {tenant} holds {len(table.jobs)} jobs and {table.output_bytes} output bytes "
            f"(limits {lim.per_tenant} jobs, {lim.output_bytes_per_tenant} bytes; finished jobs "
            f"are kept {lim.ttl_s:g} s, DELETE forgets one now)",
            retry_after_s=round(retry, 3),
            max_jobs=lim.per_tenant,
        )

    def create(
        self,
        tenant: str,
        function: str,
        run: GuestRun,
        sink: JobOutput,
        bytes_in: int,
        future: asyncio.Future[Any],
    ) -> Job:
        job = Job(tenant, function, run, sink, bytes_in, self._clock())
        job.future = future
        self._tables.setdefault(tenant, _Table()).jobs[job.id] = job
        future.add_done_callback(lambda fut: self._finish(job, fut))
        self._arm()
        return job

    def get(self, tenant: str, job_id: str) -> Job:
        table = self._purged(tenant)
        job = table.jobs.get(job_id) if table is not None else None
        if job is None:
            raise NotFound(f"no job {job_id!r} for this tenant (unknown, expired or another tenant's)")
        return job

    def list(self, tenant: str) -> list[Job]:
        table = self._purged(tenant)
        return list(table.jobs.values()) if table is not None else []

    def cancel(self, tenant: str, job_id: str) -> Job:
        """Cancel an active job (it stays, as cancelled, until it expires); forget a finished one."""
        job = self.get(tenant, job_id)
        if job.state in _ACTIVE:
            job.run.cancel("cancelled by DELETE /v1/jobs")
            job.state = CANCELLED
            job.error = Cancelled("the job was cancelled").to_json()["error"]
            self._ended(job)
            if job.future is not None:
                # A queued job never starts; a running one is stopped on its worker within one
                # deadline slice (engine/deadlines.py) or at its next stream_write, if sooner.
                job.future.cancel()
        else:
            self._forget(self._tables[tenant], job)
        return job

    def refuse_queued(self, tenant: str) -> int:
        """At `tenant`'s move barrier (Shard.on_hold): fail its jobs that have not started, kind
        tenant_moving. Each would hold the barrier for its whole run, and its result could not be read
        on the new shard; running ones finish (the barrier waits for them). The number failed."""
        table = self._tables.get(tenant)
        error = TenantMoving(
            f"tenant {tenant} is moving to another shard: the job was not started; submit it again"
        )
        refused = 0
        for job in list(table.jobs.values()) if table is not None else []:
            if job.state != QUEUED or job.run.started is not None:
                continue
            job.run.cancel(error.message)  # never starts (one starting right now stops at once)
            job.state = FAILED
            job.error = error.to_json()["error"]
            self._ended(job)
            if job.future is not None:
                job.future.cancel()
            refused += 1
        return refused

    @contextlib.contextmanager
    def reading(self, job: Job) -> Iterator[None]:
        """A read of `job`'s output in flight (the HTTP handlers, for as long as they may send
        it): if the job is forgotten meanwhile (DELETE, expiry), its output stays charged to the
        tenant's job output budget until the last such read ends, so readers that read slowly
        cannot hold outputs past the budget that admitted them."""
        job.readers += 1
        try:
            yield
        finally:
            job.readers -= 1
            table = job.pinned
            if not job.readers and table is not None:
                job.pinned = None
                table.output_bytes -= len(job.output or b"")

    def forget_except(self, tenants: set[str]) -> None:
        """Drop the tables of tenants no longer served here (their jobs cannot be read any more)."""
        for name in [n for n in self._tables if n not in tenants]:
            for job in self._tables[name].jobs.values():
                job.run.cancel("the tenant left this shard")
            del self._tables[name]

    def purge_all(self) -> None:
        """Forget the expired jobs of every tenant (not only of the one calling): only the due
        entries of the heap of expiries are touched."""
        now = self._clock()
        heap, tables = self._expiries, self._tables
        while heap and heap[0][0] <= now:
            _, tenant, job_id = heapq.heappop(heap)
            table = tables.get(tenant)
            job = table.jobs.get(job_id) if table is not None else None
            if table is not None and job is not None and job.expires is not None and job.expires <= now:
                self._forget(table, job)

    def tick(self) -> None:
        """The periodic pass (also what the scheduled timer runs): purge every tenant's expired
        jobs, drop emptied tables, run `on_tick`; scheduled again while any table is left."""
        self._armed = False
        try:
            self.purge_all()
            for name in [n for n, t in self._tables.items() if not t.jobs and not t.output_bytes]:
                del self._tables[name]  # (a table with bytes and no job: outputs still being read)
            if self.on_tick is not None:
                self.on_tick()
        finally:
            self._arm()

    def __len__(self) -> int:
        """Tenants with a table."""
        return len(self._tables)

    def report(self) -> Iterator[tuple[str, str, int]]:
        """(tenant, state, count) for every state of every tenant with a table (metrics). Purges
        every tenant's expired jobs first, so an expired job is never counted."""
        self.purge_all()
        for tenant, table in self._tables.items():
            counts = dict.fromkeys(JOB_STATES, 0)
            for job in table.jobs.values():
                counts[job.current_state()] += 1
            for state, n in counts.items():
                yield tenant, state, n

    # --- internals ---

    def _finish(self, job: Job, fut: asyncio.Future[Any]) -> None:
        if job.state not in _ACTIVE:  # cancelled meanwhile: its result (if any) is dropped
            return
        table = self._tables.get(job.tenant)
        if table is None or table.jobs.get(job.id) is not job:
            return
        if fut.cancelled():  # not by cancel()/refuse_queued() (they set the state first): say so
            job.sink.chunks = []
            job.state = CANCELLED
            job.error = Cancelled("the job was cancelled before it finished").to_json()["error"]
            self._ended(job)
            return
        error = fut.exception()
        if error is None:
            result: bytes = fut.result()
            output = b"".join((*job.sink.chunks, result)) if job.sink.chunks else result
            room = self.limits.output_bytes_per_tenant - table.output_bytes
            if len(output) > job.sink.limit:  # the return value counts with the streamed chunks
                error = GuestLimitExceeded(
                    f"the job's streamed chunks and return value ({len(output)} bytes) passed its "
                    f"{job.sink.limit}-byte output limit",
                    limit="maxOutputBytes",
                    value=job.sink.limit,
                )
            elif len(output) > room:
                error = GuestLimitExceeded(
                    f"the job's {len(output)}-byte output does not fit the tenant's "
                    f"{self.limits.output_bytes_per_tenant}-byte job output budget ({room} bytes left)",
                    limit="jobOutputBytes",
                    value=self.limits.output_bytes_per_tenant,
                )
            else:
                job.output = output
                table.output_bytes += len(output)
                job.state = SUCCEEDED
        job.sink.chunks = []
        if job.state != SUCCEEDED:
            job.state = FAILED
            if isinstance(error, RuntimeFault):
                job.error = error.to_json()["error"]
            else:  # a bug, not the guest's fault: say so without leaking internals
                job.error = RuntimeFault(f"internal error ({type(error).__name__})").to_json()["error"]
        self._ended(job)

    def _ended(self, job: Job) -> None:
        job.finished = self._clock()
        job.expires = job.finished + self.limits.ttl_s
        heapq.heappush(self._expiries, (job.expires, job.tenant, job.id))
        if len(self._expiries) > self._compact_at:
            self._expiries = [(j.expires, name, j.id) for name, t in self._tables.items()
                              for j in t.jobs.values() if j.expires is not None]  # fmt: skip
            heapq.heapify(self._expiries)
            self._compact_at = max(_HEAP_COMPACT_MIN, 2 * len(self._expiries))

    def _arm(self) -> None:
        """Schedule the next tick, unless one is already scheduled or there is nothing to look after
        (or no running loop: a board used outside one is purged by its callers only)."""
        if self._armed or not self._tables:
            return
        schedule = self._schedule
        if schedule is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            schedule = lambda delay, tick: loop.call_later(delay, tick)  # noqa: E731
        self._armed = True
        schedule(TICK_S, self.tick)

    def _purged(self, tenant: str) -> _Table | None:
        table = self._tables.get(tenant)
        if table is None:
            return None
        now = self._clock()
        for job in [j for j in table.jobs.values() if j.expires is not None and j.expires <= now]:
            self._forget(table, job)
        return table

    def _forget(self, table: _Table, job: Job) -> None:
        del table.jobs[job.id]
        if job.readers:
            job.pinned = table  # still being sent: charged until the last read ends (reading())
        else:
            table.output_bytes -= len(job.output or b"")


def _wall(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
