"""A move waiting for a target pod that never gets Ready: bounded, and the source keeps its room.

Review R2 G5. A scale-out places tenants on the new shard at once, and their moves wait for its pod
to be Ready. Meanwhile (a) the source still serves them, so the ledger counts them there as well as
on the target: new Tenants cannot fill the room they still use; (b) the wait lasts at most the
move's deadline: then the tenant goes back to its source in the ledger with a Warning Event
(TargetNeverReady, naming the pod and what it says), and the move is tried again after the
back-off (status.pendingMove names the target meanwhile). The real Reconciler, SnapshotMove, Ledger
and kube client against tests/fake_kube.py; the test plays the kubelet and the shards, and owns the
clock: a deadline passes only when the test moves it.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

from tensorwasm.operator.moves import SnapshotMove, pod_says
from tensorwasm.operator.reconciler import Reconciler
from tests.fake_kube import FakeKube, until, with_fake_kube
from tests.unit.test_moves import (
    NAMES,
    ONE_SHARD,
    PODS,
    S0,
    S1,
    Clock,
    events,
    move,
    operator,
    ready_pod,
    selected,
)
from tests.unit.test_reconciler_inprocess import SNAPSHOTS, STATEFULSETS, TENANTS, condition, status, tenant
from tests.unit.test_reconciler_inprocess import operator as reconciler_running

CAP = 4
UNSCHEDULABLE = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
DEADLINE = 121  # MOVE_SNAPSHOT_TIMEOUT 120 s + the default timeoutMs (1 s)


def phase(fake: FakeKube, name: str) -> str:
    return str(status(fake, name).get("phase") or "")


def decided(fake: FakeKube, name: str) -> bool:
    """The Tenant is placed on a shard, or Pending (no shard has room)."""
    return bool(status(fake, name).get("shard")) or phase(fake, name) == "Pending"


def unschedulable_pod(name: str) -> dict[str, Any]:
    """A shard pod no node can take (no GPU free): Pending, and it says why."""
    scheduled = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": UNSCHEDULABLE,
    }
    return {"metadata": {"name": name}, "status": {"phase": "Pending", "conditions": [scheduled]}}


async def grown_with_an_unready_pod(fake: FakeKube, reconciler: Reconciler, names: list[str]) -> list[str]:
    """`names` Placed on shard 0, then scaled to 2 shards whose new pod is not Ready: the tenants the
    ledger placed on shard 1, once each says so in status.pendingMove."""
    for name in names:
        await fake.put(TENANTS, tenant(name))
    await fake.wait_for(lambda: all(status(fake, n).get("shard") == S0 for n in names))
    await fake.put(PODS, unschedulable_pod(S1))
    sts = fake.get(STATEFULSETS, "tensorwasm-shard")
    assert sts is not None
    await fake.put(STATEFULSETS, {**sts, "spec": {**sts["spec"], "replicas": 2}})
    placed: list[str] = await until(lambda: [n for n in names if reconciler.ledger.shard_of(n) == 1])
    await fake.wait_for(lambda: all(status(fake, n).get("pendingMove") == {"target": S1} for n in placed))
    return placed


def test_tenants_waiting_for_their_target_keep_their_room_on_the_source_so_new_tenants_go_pending() -> None:
    old, new = [f"t{i}" for i in range(CAP)], [f"n{i}" for i in range(CAP)]

    async def body(fake: FakeKube) -> None:
        settings = replace(ONE_SHARD, shard_capacity=replace(ONE_SHARD.shard_capacity, max_tenants=CAP))
        async with reconciler_running(fake, settings, Clock()) as reconciler:
            placed = await grown_with_an_unready_pod(fake, reconciler, old)
            assert placed, "the scale-out places at least one tenant on the new shard"
            # Shard 0 still serves all of them, though the ledger places some on shard 1. New
            # Tenants, one at a time: shard 1 takes what fits; then one that would fit only if the
            # waiting tenants were not counted on shard 0 goes Pending instead.
            for name in new:
                await fake.put(TENANTS, tenant(name))
                await fake.wait_for(partial(decided, fake, name))
            assert [n for n in old + new if status(fake, n).get("shard") == S0] == old
            assert sorted(n for n in new if status(fake, n).get("shard") == S1) == new[: CAP - len(placed)]
            waiting = [n for n in new if phase(fake, n) == "Pending"]
            assert waiting == new[CAP - len(placed) :]
            assert all(condition(fake, n, "Placed")["reason"] == "InsufficientCapacity" for n in waiting)
            assert [reconciler.ledger.usage(s).tenants for s in (0, 1)] == [CAP, CAP]

    with_fake_kube(body)


def test_a_target_pod_never_ready_by_the_deadline_gives_the_tenant_back_to_its_source_with_an_event() -> None:
    async def body(fake: FakeKube) -> None:
        clock = Clock()
        async with operator(fake, clock) as reconciler:
            mover = reconciler.mover
            assert isinstance(mover, SnapshotMove)
            placed = await grown_with_an_unready_pod(fake, reconciler, NAMES)
            clock.seconds = DEADLINE - 1  # not yet: still waiting, still placed on shard 1
            for name in placed:
                await reconciler.reconcile(name)
            assert all(reconciler.ledger.shard_of(n) == 1 for n in placed)
            assert events(fake, "TargetNeverReady") == []
            clock.seconds = DEADLINE
            await fake.wait_for(lambda: len(events(fake, "TargetNeverReady")) == len(placed))
            await until(lambda: all(reconciler.ledger.shard_of(n) == 0 for n in NAMES))
            await reconciler.drain()
            said = events(fake, "TargetNeverReady")
            assert sorted(e["involvedObject"]["name"] for e in said) == sorted(placed)
            for event in said:
                assert event["type"] == "Warning"
                assert f"shard {S1} not Ready after {DEADLINE}s" in event["message"]
                assert f"pod {S1}: Pending, Unschedulable: {UNSCHEDULABLE}" in event["message"]
                assert f"tried again in {DEADLINE}s" in event["message"]
            # Back on the source, counted once; nothing was held; the target is still named.
            assert [reconciler.ledger.usage(s).tenants for s in (0, 1)] == [len(NAMES), 0]
            for name in NAMES:
                assert (
                    status(fake, name)["shard"] == S0 and selected(fake, name) == S0 and not move(fake, name)
                )
            assert all(status(fake, n).get("pendingMove") == {"target": S1} for n in placed)
            assert mover.waiting_for_targets() == {} and mover.backing_off() == dict.fromkeys(
                placed, DEADLINE
            )
            assert fake.items(SNAPSHOTS) == [] and events(fake, "MoveRolledBack") == []

    with_fake_kube(body)


def test_after_the_back_off_the_move_is_tried_again_and_completes_once_the_pod_gets_ready() -> None:
    async def body(fake: FakeKube) -> None:
        clock = Clock()
        async with operator(fake, clock) as reconciler:
            placed = await grown_with_an_unready_pod(fake, reconciler, NAMES)
            clock.seconds = DEADLINE
            await fake.wait_for(lambda: len(events(fake, "TargetNeverReady")) == len(placed))
            await until(lambda: all(reconciler.ledger.shard_of(n) == 0 for n in placed))
            clock.seconds = 2 * DEADLINE - 1  # inside the back-off: not placed on shard 1 again
            for name in placed:
                await reconciler.reconcile(name)
            assert all(reconciler.ledger.shard_of(n) == 0 for n in placed)
            # The back-off is over: placed on shard 1 again, waiting for its pod anew (counted on
            # both shards meanwhile) ...
            clock.seconds = 2 * DEADLINE
            await until(lambda: all(reconciler.ledger.shard_of(n) == 1 for n in placed))
            assert [reconciler.ledger.usage(s).tenants for s in (0, 1)] == [len(NAMES), len(placed)]
            assert not any(move(fake, n) for n in NAMES)
            # ... the pod gets Ready: the same tenants move through the barrier, and nothing rolls back.
            await fake.put_status(PODS, S1, {"phase": "Running", **ready_pod(S1)["status"]})
            await fake.wait_for(lambda: all(move(fake, n).get("phase") == "Holding" for n in placed))
            for name in placed:
                await fake.put_status(SNAPSHOTS, move(fake, name)["snapshot"], {"phase": "Ready"})
            await fake.wait_for(lambda: all(move(fake, n).get("phase") == "Restoring" for n in placed))
            for name in placed:
                await fake.put_status(TENANTS, name, {"runtime": {"shard": S1, "loaded": True}})
            await fake.wait_for(lambda: all(not move(fake, n) and selected(fake, n) == S1 for n in placed))
            await fake.wait_for(lambda: not any(status(fake, n).get("pendingMove") for n in NAMES))
            assert [reconciler.ledger.usage(s).tenants for s in (0, 1)] == [
                len(NAMES) - len(placed),
                len(placed),
            ]
            assert len(events(fake, "TargetNeverReady")) == len(placed)
            assert events(fake, "MoveRolledBack") == [] and events(fake, "MoveDeferred") == []

    with_fake_kube(body)


def test_a_tenant_deleted_while_its_move_waits_or_backs_off_is_forgotten_by_the_mover() -> None:
    async def body(fake: FakeKube) -> None:
        clock = Clock()
        async with operator(fake, clock) as reconciler:
            mover = reconciler.mover
            assert isinstance(mover, SnapshotMove)
            placed = await grown_with_an_unready_pod(fake, reconciler, NAMES)
            assert len(placed) >= 1 and set(mover.waiting_for_targets()) == set(placed)
            await fake.remove(TENANTS, placed[0])  # deleted while waiting for the target pod
            await until(lambda: placed[0] not in mover.waiting_for_targets())
            if len(placed) > 1:  # and one deleted while it backs off after the deadline
                clock.seconds = DEADLINE
                await fake.wait_for(lambda: len(events(fake, "TargetNeverReady")) == len(placed) - 1)
                await until(lambda: placed[1] in mover.backing_off())
                await fake.remove(TENANTS, placed[1])
                await until(lambda: placed[1] not in mover.backing_off())

    with_fake_kube(body)


def test_what_a_pod_says_tolerates_null_and_odd_entries_in_its_status() -> None:
    """Review R3 K9: the pod's status is the cluster's words; a null condition or container (a
    buggy admission webhook, a hand-made pod) must not fail the tenant's reconcile."""
    odd = {
        "metadata": None,
        "status": {
            "phase": "Pending",
            "containerStatuses": [None, "x", {"state": None}, {"state": {"waiting": None}}],
            "conditions": [None, 7, {"status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE}],
        },
    }
    assert pod_says(S1, odd) == f"pod {S1}: Pending, Unschedulable: {UNSCHEDULABLE}"
    assert pod_says(S1, {"status": {"conditions": [None]}}) == f"pod {S1}: phase unknown"
    assert pod_says(S1, {"status": None}) == f"pod {S1}: phase unknown"
    assert (
        pod_says(S1, {"status": {"conditions": "garbage", "containerStatuses": {}}})
        == f"pod {S1}: phase unknown"
    )
