"""A roll of shards filled under the mean admission model finishes under the binomial tail model.

Review R3 K3. Before 52c3b4f a shard's sleepers counted at their mean awake share (10 sleepers of
1 GiB in a room of 1 cap at 10%), now by the binomial tail (1 there). The upgrade's own roll must
move those tenants one-for-one: onto the surge shard, then back onto the replaced shard when the
surge shard is scaled in, by the model they were admitted by, with a Warning Event; a new Tenant
still follows the current model. The roll's harness of test_roll.py (the test plays the
StatefulSet controller and the shards).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from tensorwasm.operator.reconciler import OVER_MODEL
from tensorwasm.planner.admission import ShardCapacity
from tests.fake_kube import FakeKube, with_fake_kube
from tests.unit.test_moves import EVENTS, NAMES, ONE_SHARD, PODS, S0, Clock, move
from tests.unit.test_reconciler_inprocess import STATEFULSETS, TENANTS, status, tenant
from tests.unit.test_reconciler_inprocess import operator as reconciler_running
from tests.unit.test_roll import Cluster, occupancy_peaks, roll_over

GIB = 1 << 30
SLEEPER = {"limits": {"gpuMemory": "1Gi"}, "idle": {"after": "60s"}}


def capacity(caps: float) -> ShardCapacity:
    return ShardCapacity(int(caps * 1.5 * GIB), 100, 64 * GIB, max_tenants=100, active_fraction=0.1)


def test_a_roll_of_a_shard_filled_under_the_mean_model_finishes_and_new_tenants_follow_the_tail() -> None:
    # Four 1 GiB sleepers on one shard (the mean model allowed 10 in a room of 1 cap at 10%); the
    # tail model allows 1 there: without the fallback the surge shard takes 1 and the roll waits.
    roomy = replace(ONE_SHARD, shard_capacity=capacity(3))  # the tail allows 6: all four placed
    tight = replace(ONE_SHARD, shard_capacity=capacity(1))
    names = NAMES[:4]

    async def body(fake: FakeKube) -> None:
        cluster = Cluster(fake, names)
        player = asyncio.create_task(cluster.run())
        try:
            async with reconciler_running(fake, roomy, Clock()):
                for name in names:
                    await fake.put(TENANTS, tenant(name, **SLEEPER))
                await fake.wait_for(lambda: all(status(fake, n).get("shard") == S0 for n in names), 60)
            async with reconciler_running(fake, tight, Clock()) as reconciler:
                await fake.put_status(STATEFULSETS, "tensorwasm-shard", {"updateRevision": "r2"})
                await fake.wait_for(lambda: fake.get(PODS, "tensorwasm-shard-1"), 60)  # the surge
                await fake.wait_for(
                    lambda: (
                        roll_over(fake, 1)
                        and all(not move(fake, n) and status(fake, n).get("shard") == S0 for n in names)
                    ),
                    120,
                )
                assert not [e for e in fake.items(EVENTS) if e["reason"] == "RollWaitingForRoom"]
                over = [e for e in fake.items(EVENTS) if e["reason"] == OVER_MODEL]
                assert over and all(e["type"] == "Warning" for e in over)
                assert {e["involvedObject"]["kind"] for e in over} == {"StatefulSet"}
                said = " ".join(e["message"] for e in over)
                assert "shard roll: shard tensorwasm-shard-1 took 3 tenant(s)" in said, said
                assert "scale-in: shard tensorwasm-shard-0 took 3 tenant(s)" in said, said
                # A new Tenant follows the current model: the shard is past it, so it waits.
                await fake.put(TENANTS, tenant("late", **SLEEPER))
                await fake.wait_for(lambda: status(fake, "late").get("phase") == "Pending", 60)
                assert reconciler.ledger.shard_of("late") is None
        finally:
            player.cancel()
        pod_ = fake.get(PODS, S0)
        assert pod_ is not None and pod_["metadata"]["labels"]["controller-revision-hash"] == "r2"
        assert cluster.gaps == [], "a Service selected a pod that was not there"
        assert occupancy_peaks(fake)["tensorwasm-shard-1"] == 4  # one-for-one: the drained shard's

    with_fake_kube(body)
