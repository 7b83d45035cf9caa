"""Async jobs expire without their tenant calling again (review F2, the rest): the board's tick
forgets every tenant's expired jobs and the tables of tenants that left the shard. A fake clock and
a recording scheduler drive the tick; one test lets the real event loop's timer do it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from tensorwasm.runtime.api.admission import AdmissionLimits
from tensorwasm.runtime.api.app import _Api
from tensorwasm.runtime.api.guard import ConnectionLimits
from tensorwasm.runtime.api.jobs import TICK_S, JobBoard, JobLimits, JobOutput
from tensorwasm.runtime.tenancy.runs import GuestRun

DEADLINE_S = 30.0


class _Timers:
    """call_later stand-in: remembers what was scheduled; `fire` runs what is due."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> None:
        self.pending.append((delay, callback))

    def fire(self) -> None:
        due, self.pending = self.pending, []
        for _, callback in due:
            callback()


def _finished_job(board: JobBoard, loop: asyncio.AbstractEventLoop, tenant: str, output: bytes) -> None:
    fut: asyncio.Future[Any] = loop.create_future()
    board.create(tenant, "echo", GuestRun(), JobOutput(1 << 20), 0, fut)
    fut.set_result(output)
    loop.run_until_complete(asyncio.sleep(0))  # the future's done callbacks run on the loop


def test_an_idle_tenants_expired_outputs_are_freed_without_it_calling() -> None:
    now = [1000.0]
    timers = _Timers()
    board = JobBoard(JobLimits(ttl_s=60, output_bytes_per_tenant=10), clock=lambda: now[0], schedule=timers)
    loop = asyncio.new_event_loop()
    try:
        _finished_job(board, loop, "idle", b"0123456789")  # its whole output budget
        assert board._tables["idle"].output_bytes == 10
        assert [d for d, _ in timers.pending] == [TICK_S]  # the board looks after itself
        now[0] += 30
        timers.fire()  # before its expiry: kept, and the tick comes again
        assert board._tables["idle"].output_bytes == 10 and len(timers.pending) == 1
        now[0] += 31
        timers.fire()  # nobody called: the tick alone frees it
        assert "idle" not in board._tables and len(board) == 0
        assert timers.pending == []  # an empty board schedules nothing
        assert sum(n for _, _, n in board.report()) == 0
        _finished_job(board, loop, "idle", b"x")  # the next job arms the tick again
        assert len(timers.pending) == 1
    finally:
        loop.close()


def test_only_due_jobs_go_and_forgotten_ones_do_not_grow_the_heap() -> None:
    now = [0.0]
    timers = _Timers()
    board = JobBoard(JobLimits(ttl_s=10), clock=lambda: now[0], schedule=timers)
    loop = asyncio.new_event_loop()
    try:
        _finished_job(board, loop, "a", b"old")
        now[0] += 5
        _finished_job(board, loop, "b", b"new")
        now[0] += 6  # a's job is due, b's is not
        timers.fire()
        assert "a" not in board._tables and board._tables["b"].output_bytes == 3
        # A tenant that creates and DELETEs jobs as fast as it can leaves an entry in the heap per
        # job until its expiry; the heap is rebuilt from the live jobs, so it stays bounded.
        for _ in range(20_000):
            fut: asyncio.Future[Any] = loop.create_future()
            job = board.create("c", "echo", GuestRun(), JobOutput(1 << 20), 0, fut)
            fut.set_result(b"y")
            loop.run_until_complete(asyncio.sleep(0))
            board.cancel("c", job.id)  # a finished job: forgotten at once
        assert len(board._expiries) <= 2048
        now[0] += 11
        timers.fire()
        assert len(board) == 0 and board._expiries == []
    finally:
        loop.close()


def test_the_event_loops_timer_drops_expired_jobs_and_departed_tenants() -> None:
    # The default scheduler is the running loop's: no request, no scrape, yet both go.
    alpha, beta = SimpleNamespace(name="alpha"), SimpleNamespace(name="beta")
    shard = SimpleNamespace(
        on_hold=[], served={"alpha": alpha, "beta": beta}, by_auth={}, assigned={}, holds={}
    )
    api = _Api(shard, AdmissionLimits(), ConnectionLimits(), JobLimits(ttl_s=0.01))  # type: ignore[arg-type]

    async def scenario() -> None:
        for name in ("alpha", "beta"):
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            api.jobs.create(name, "echo", GuestRun(), JobOutput(1 << 20), 0, fut)
            if name == "alpha":
                fut.set_result(b"done")  # alpha's job finishes and expires
        shard.served = {"alpha": alpha}  # beta leaves, its job still queued
        shard.by_auth = {}  # the shard replaces by_auth whenever its served set changes
        async with asyncio.timeout(DEADLINE_S):
            while len(api.jobs) > 0:
                await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert api.jobs.list("alpha") == [] and api.jobs.list("beta") == []
