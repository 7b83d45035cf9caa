"""A move's deadline grows with the tenant's own timeoutMs, and a rolled-back move backs off.

The source's barrier waits for the tenant's running invokes and async jobs, each bounded by its
spec.limits.timeoutMs (up to 600 s): a move of a tenant running one long job must not roll back at
MOVE_SNAPSHOT_TIMEOUT (120 s) and then be held again on the roll's next tick, for ever (review F16).
The real Reconciler, SnapshotMove, ShardRoll and kube client against tests/fake_kube.py; the test
plays the shards (the source's capture, which a long job delays, and the target's report) and
owns the clock: a deadline passes only when the test moves it.
"""

from __future__ import annotations

import asyncio

import pytest

from tensorwasm.api.tenant import parse_tenant
from tensorwasm.operator.moves import (
    MOVE_BACKOFF_MAX_S,
    MOVE_DEADLINE_MAX_S,
    SnapshotMove,
    backoff_s,
    move_deadline,
)
from tests.fake_kube import FakeKube, with_fake_kube
from tests.unit.test_moves import PODS, S0, S1, Clock, events, move, operator, placed_then_grown, selected
from tests.unit.test_reconciler_inprocess import SNAPSHOTS, STATEFULSETS, TENANTS, status, tenant
from tests.unit.test_roll import Cluster, pod

LONG = {"timeoutMs": 300_000}  # one async batch job may hold the barrier five minutes


@pytest.mark.parametrize(
    ("timeout_ms", "timeout_s", "deadline"),
    [(1000, 120, 121.0), (300_000, 120, 420.0), (600_000, 120, 720.0), (600_000, 3600, MOVE_DEADLINE_MAX_S)],
)
def test_a_moves_deadline_is_the_move_timeout_plus_the_tenants_timeout_bounded(
    timeout_ms: int, timeout_s: int, deadline: float
) -> None:
    body = tenant("a", limits={"timeoutMs": timeout_ms})
    parsed = parse_tenant({**body, "metadata": {"name": "a", "namespace": "tw", "uid": "u"}})
    assert move_deadline(parsed, timeout_s) == deadline


def test_the_back_off_doubles_with_each_rollback_in_a_row_up_to_its_bound() -> None:
    assert [backoff_s(420, n) for n in (1, 2, 3)] == [420, 840, 1680]
    assert backoff_s(420, 5) == backoff_s(420, 10_000) == MOVE_BACKOFF_MAX_S


def test_a_tenant_with_a_long_timeout_keeps_its_move_past_the_move_timeout_and_completes() -> None:
    async def body(fake: FakeKube) -> None:
        clock = Clock()
        async with operator(fake, clock) as reconciler:
            movers = await placed_then_grown(fake, limits=LONG)
            holding = {n: move(fake, n) for n in movers}
            assert all(m["phase"] == "Holding" for m in holding.values())
            # Past MOVE_SNAPSHOT_TIMEOUT (the old deadline) and just short of 120 s + 300 s: the
            # source is still waiting for the long job, and the move goes on.
            for seconds in (121, 419):
                clock.seconds = seconds
                for name in movers:
                    await reconciler.reconcile(name)
                    assert move(fake, name) == holding[name], (seconds, name)
                    assert status(fake, name)["shard"] == S0 and selected(fake, name) == S0
            assert events(fake, "MoveRolledBack") == []
            # The job ends, the source captures; the target restores and reports: done.
            for name in movers:
                await fake.put_status(SNAPSHOTS, holding[name]["snapshot"], {"phase": "Ready"})
            await fake.wait_for(lambda: all(move(fake, n).get("phase") == "Restoring" for n in movers))
            for name in movers:
                await fake.put_status(TENANTS, name, {"runtime": {"shard": S1, "loaded": True}})
            await fake.wait_for(lambda: all(not move(fake, n) and selected(fake, n) == S1 for n in movers))
            assert events(fake, "MoveRolledBack") == [] and events(fake, "MoveDeferred") == []

    with_fake_kube(body)


def test_a_move_past_its_own_deadline_rolls_back_once_and_the_roll_retries_it_after_the_back_off() -> None:
    name = "long"

    async def body(fake: FakeKube) -> None:
        await pod(fake, S0, "r1")
        cluster = Cluster(fake, [name])
        cluster.blocked.add(name)  # its source never captures: the job outlives even its own bound
        clock = Clock()
        async with operator(fake, clock) as reconciler:
            await fake.put(TENANTS, tenant(name, limits=LONG))
            await fake.wait_for(lambda: status(fake, name).get("shard") == S0)
            player = asyncio.create_task(cluster.run())
            try:
                # helm upgrade: the roll surges and drains shard 0, so the tenant is held for its move.
                await fake.put_status(STATEFULSETS, "tensorwasm-shard", {"updateRevision": "r2"})
                first = await fake.wait_for(
                    lambda: move(fake, name).get("phase") == "Holding" and move(fake, name)
                )
                clock.seconds = 420  # 120 s + its 300 s timeoutMs: its own deadline passes
                await fake.wait_for(lambda: events(fake, "MoveRolledBack"))
                [rolled] = events(fake, "MoveRolledBack")
                assert "not Ready after 420s" in rolled["message"]
                assert "no new move starts for 420s" in rolled["message"]
                # The roll places it on the surge shard again at once, but the move waits out the
                # back-off: nothing is held, the source serves it, and an Event says why.
                await fake.wait_for(lambda: events(fake, "MoveDeferred"))
                [deferred] = events(fake, "MoveDeferred")
                assert deferred["type"] == "Warning" and deferred["involvedObject"]["name"] == name
                assert "waits 420s more" in deferred["message"] and "rolled back" in deferred["message"]
                await fake.wait_for(lambda: status(fake, name).get("pendingMove") == {"target": S1})
                await reconciler.reconcile(name)  # however often it is asked: not before the back-off
                assert (
                    not move(fake, name) and status(fake, name)["shard"] == S0 and selected(fake, name) == S0
                )
                assert fake.get(SNAPSHOTS, first["snapshot"]) is None  # the unfinished capture went
                assert isinstance(reconciler.mover, SnapshotMove)
                assert reconciler.mover.backing_off() == {name: 420}
                # The job has ended; once the back-off is over the roll's move starts again and ends.
                cluster.blocked.discard(name)
                clock.seconds = 840
                second = await fake.wait_for(lambda: move(fake, name).get("snapshot") and move(fake, name))
                assert second["snapshot"] != first["snapshot"] and second["target"] == S1
                await fake.wait_for(
                    lambda: not fake.get(PODS, S1) and status(fake, name).get("shard") == S0, 60
                )
            finally:
                player.cancel()
            assert len(events(fake, "MoveRolledBack")) == 1 and len(events(fake, "MoveDeferred")) == 1
            assert not status(fake, name).get("pendingMove") and cluster.gaps == []
            new = fake.get(PODS, S0)
            assert new is not None and new["metadata"]["labels"]["controller-revision-hash"] == "r2"

    with_fake_kube(body)
