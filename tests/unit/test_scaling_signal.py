"""The autoscaling signal a shard exports: queue depth, capacity and queue wait, as /metrics serves them.

A real TenantQueue (real worker threads) and the runtime's own registry: the depth and the
saturation rise while invokes wait and reach capacity exactly when the next one is refused with 429;
every wait lands in tensorwasm_queue_wait_seconds, so a burst between two scrapes is still counted.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client import generate_latest

from tensorwasm.runtime import metrics
from tensorwasm.runtime.errors import QueueFull
from tensorwasm.runtime.tenancy.queue import TenantQueue


def samples(name: str) -> dict[str, float]:
    """Every sample of one metric family from the runtime's registry: {labels text: value}."""
    out: dict[str, float] = {}
    for line in generate_latest(metrics.REGISTRY).decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series[len(name) :]] = float(value)
    return out


def test_depth_and_saturation_rise_before_429_and_fall_after() -> None:
    async def main() -> None:
        q = TenantQueue("signal", max_concurrency=1, queue_length=3, loop=asyncio.get_running_loop())
        previous = metrics.TENANT_LOAD.source
        metrics.TENANT_LOAD.source = lambda: [
            metrics.TenantLoad("signal", q.depth, q.in_flight, True, q.capacity)
        ]
        gate, started = threading.Event(), threading.Event()

        def work(_a: object, _b: object) -> None:
            started.set()
            gate.wait()

        try:
            seen = []
            futs = []
            for _ in range(q.capacity):
                futs.append(q.submit(work, None, None))
                depth = samples("tensorwasm_queue_depth")['{tenant="signal"}']
                running = samples("tensorwasm_invocations_in_flight")['{tenant="signal"}']
                capacity = samples("tensorwasm_tenant_queue_capacity")['{tenant="signal"}']
                seen.append((depth, (depth + running) / capacity))
            # Each admitted invoke raises the saturation by 1/capacity; the depth counts the waiting ones.
            assert seen == [(0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0)]
            with pytest.raises(QueueFull):  # saturation 1.0 is exactly where 429 starts
                q.submit(work, None, None)
            await asyncio.wait_for(asyncio.to_thread(started.wait), 60)
            gate.set()
            await asyncio.gather(*futs)
            assert samples("tensorwasm_queue_depth")['{tenant="signal"}'] == 0  # falls once drained
        finally:
            gate.set()
            metrics.TENANT_LOAD.source = previous
            q.close()

    asyncio.run(main())


def test_every_wait_is_counted_in_the_queue_wait_histogram() -> None:
    async def main() -> None:
        before = samples("tensorwasm_queue_wait_seconds")
        q = TenantQueue("waits", max_concurrency=1, queue_length=4, loop=asyncio.get_running_loop())
        gate = threading.Event()
        futs = [q.submit(lambda _a, _b: gate.wait(), None, None) for _ in range(5)]
        # The four queued invokes wait at least until the gate opens: hold it until they are queued.
        while q.depth < 4:  # state, not time: every one of them is waiting in the queue
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)  # the measured wait (asserted as a lower bound: never flaky)
        gate.set()
        await asyncio.gather(*futs)
        q.close()
        after = samples("tensorwasm_queue_wait_seconds")
        assert after["_count"] - before["_count"] == 5
        # Four waited behind the first for at least the 50 ms the gate was shut.
        assert after['_bucket{le="0.01"}'] - before['_bucket{le="0.01"}'] <= 1
        assert after["_sum"] - before["_sum"] >= 4 * 0.05

    asyncio.run(main())
