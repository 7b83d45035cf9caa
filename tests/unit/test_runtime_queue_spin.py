"""The queue's opt-in spin (TENSORWASM_RUNTIME_QUEUE_SPIN_US, issue 16): with it, a short job handed to
a worker is finished when `submit` returns on an otherwise idle loop (the loop thread waited instead
of going idle); without it, never before the loop ran again; long jobs are never waited for."""

from __future__ import annotations

import asyncio
import threading

from tensorwasm.runtime.tenancy import queue as queue_mod
from tensorwasm.runtime.tenancy.queue import TenantQueue


def submit_once(spin_s: float, service_s: float) -> tuple[bool, object]:
    async def main() -> tuple[bool, object]:
        q = TenantQueue("t", max_concurrency=1, queue_length=4, loop=asyncio.get_running_loop())
        q._service_s = service_s  # what earlier invokes of this tenant took
        fut = q.submit(lambda a, b: a + b, 40, 2)
        done_at_return = fut.done()
        return done_at_return, await fut

    old = queue_mod._SPIN_S
    queue_mod._SPIN_S = spin_s
    try:
        return asyncio.run(main())
    finally:
        queue_mod._SPIN_S = old


def test_a_short_job_is_collected_before_submit_returns() -> None:
    # A generous window: a busy machine may take long to schedule the worker, the result is the same.
    assert submit_once(spin_s=5.0, service_s=1e-5) == (True, 42)


def test_without_the_spin_the_result_waits_for_the_loop() -> None:
    assert submit_once(spin_s=0.0, service_s=1e-5) == (False, 42)


def test_jobs_slower_than_the_window_are_not_waited_for() -> None:
    assert submit_once(spin_s=1e-4, service_s=0.01) == (False, 42)


def test_a_job_still_running_when_the_window_ends_is_finished_by_the_loop() -> None:
    gate = threading.Event()

    async def main() -> tuple[bool, object]:
        q = TenantQueue("t", max_concurrency=1, queue_length=4, loop=asyncio.get_running_loop())
        q._service_s = 1e-5

        def slow(a: int, b: int) -> int:
            gate.wait()
            return a + b

        fut = q.submit(slow, 1, 2)
        done_at_return = fut.done()
        gate.set()
        return done_at_return, await fut

    old = queue_mod._SPIN_S
    queue_mod._SPIN_S = 0.002
    try:
        assert asyncio.run(main()) == (False, 3)
    finally:
        queue_mod._SPIN_S = old
