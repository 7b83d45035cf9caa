"""TenantQueue: at most maxConcurrency run, at most queueLength wait, the rest is refused at once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tensorwasm.runtime.errors import GuestTrap, QueueFull
from tensorwasm.runtime.tenancy.queue import TenantQueue, retry_after_header


def test_concurrency_cap_queue_bound_and_queue_full() -> None:
    async def main() -> None:
        q = TenantQueue("t", max_concurrency=2, queue_length=3, loop=asyncio.get_running_loop())
        gate = threading.Event()
        running: list[int] = []
        peak = [0]
        changed = threading.Condition()

        def work(i: int, _: object) -> int:
            with changed:
                running.append(i)
                peak[0] = max(peak[0], len(running))
                changed.notify_all()
            gate.wait()  # no timeout: the test opens it only once both workers are inside
            with changed:
                running.remove(i)
            return i * 10

        def both_running() -> None:
            # Workers start on their own schedule (a busy machine may take seconds): wait for the
            # observable state, not for time.
            with changed:
                changed.wait_for(lambda: len(running) == 2)

        futs = [q.submit(work, i, None) for i in range(5)]
        assert (q.outstanding, q.in_flight, q.depth) == (5, 2, 3)
        with pytest.raises(QueueFull) as refused:
            q.submit(work, 99, None)
        assert refused.value.details["retry_after_s"] > 0
        assert refused.value.details["max_concurrency"] == 2 and q.rejected == 1
        await asyncio.wait_for(asyncio.to_thread(both_running), 60)
        assert sorted(running) == [0, 1]  # the first two jobs run; the other three wait
        gate.set()
        assert await asyncio.gather(*futs) == [0, 10, 20, 30, 40]
        assert peak[0] == 2 and q.outstanding == 0
        await q.drain()  # returns at once when idle
        q.close()
        with pytest.raises(QueueFull):
            q.submit(work, 1, None)

    asyncio.run(main())


def test_errors_reach_the_caller_and_free_the_slot() -> None:
    async def main() -> None:
        q = TenantQueue("t", max_concurrency=1, queue_length=0, loop=asyncio.get_running_loop())

        def trap(_: object, __: object) -> None:
            raise GuestTrap("unreachable")

        with pytest.raises(GuestTrap):
            await q.submit(trap, None, None)
        assert q.outstanding == 0
        assert await q.submit(lambda a, b: a + b, 2, 3) == 5  # the demoted worker serves clean calls
        q.close()

    asyncio.run(main())


def test_drain_waits_for_running_work() -> None:
    async def main() -> None:
        q = TenantQueue("t", max_concurrency=1, queue_length=1, loop=asyncio.get_running_loop())
        gate = threading.Event()
        started = threading.Event()

        def hold(_: object, __: object) -> None:
            started.set()
            gate.wait()

        fut = q.submit(hold, None, None)
        drained = asyncio.ensure_future(q.drain())
        await asyncio.wait_for(asyncio.to_thread(started.wait), 60)
        await asyncio.sleep(0)  # let drain() reach its wait
        assert not drained.done()
        gate.set()
        await asyncio.wait_for(drained, 5)
        assert fut.done()
        q.close()

    asyncio.run(main())


@pytest.mark.parametrize(("seconds", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (7.5, "8")])
def test_retry_after_header_is_whole_seconds_never_zero(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header
