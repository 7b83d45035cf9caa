"""A move waits for its target shard's pod to be Ready before the source holds the tenant.

Scaling out places tenants on the new shard at once (the ledger), but until the new pod is Ready
nothing is held: no status.move, no move Snapshot, the Service and status.shard stay on the source,
which keeps serving (no 503 tenant_moving while the pod starts). Once the pod is Ready the same
tenants move through the barrier. The real Reconciler and SnapshotMove against tests/fake_kube.py;
the test plays the kubelet (the pod's Ready condition). Waits are on state, never on time.
"""

from __future__ import annotations

from tensorwasm.operator.moves import SnapshotMove
from tests.fake_kube import FakeKube, until, with_fake_kube
from tests.unit.test_moves import (
    NAMES,
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
from tests.unit.test_reconciler_inprocess import SNAPSHOTS, STATEFULSETS, TENANTS, status, tenant


def test_scale_out_holds_nothing_until_the_new_shard_pod_is_ready_then_moves_the_same_tenants() -> None:
    async def body(fake: FakeKube) -> None:
        async with operator(fake, Clock()) as reconciler:
            for name in NAMES:
                await fake.put(TENANTS, tenant(name))
            await fake.wait_for(lambda: all(status(fake, n).get("shard") == S0 for n in NAMES))
            await fake.put(PODS, ready_pod(S1, ready=False))  # created, its probe not passed yet
            sts = fake.get(STATEFULSETS, "tensorwasm-shard")
            assert sts is not None
            await fake.put(STATEFULSETS, {**sts, "spec": {**sts["spec"], "replicas": 2}})
            # The ledger places some tenants on the new shard at once, and their reconciles find
            # its pod not Ready ...
            placed = await until(lambda: [n for n in NAMES if reconciler.ledger.shard_of(n) == 1])
            assert isinstance(reconciler.mover, SnapshotMove)
            mover = reconciler.mover
            await until(lambda: mover.waiting_for_targets() == dict.fromkeys(placed, S1))
            # ... and say so in their status (kubectl, the scaling e2e's settle check) ...
            await fake.wait_for(
                lambda: all(status(fake, n).get("pendingMove") == {"target": S1} for n in placed)
            )
            assert not any(status(fake, n).get("pendingMove") for n in NAMES if n not in placed)
            # ... and none of them is held: the source serves them as before.
            for name in NAMES:
                assert move(fake, name) == {}, (name, move(fake, name))
                assert status(fake, name)["shard"] == S0 and selected(fake, name) == S0
            assert fake.items(SNAPSHOTS) == []
            # Waiting is not a rollback: the ledger keeps them on the new shard.
            assert [n for n in NAMES if reconciler.ledger.shard_of(n) == 1] == placed
            # The kubelet reports the pod Ready: exactly those tenants start their moves.
            await fake.put_status(PODS, S1, ready_pod(S1)["status"])
            await fake.wait_for(lambda: all(move(fake, n).get("phase") == "Holding" for n in placed))
            assert mover.waiting_for_targets() == {}
            assert not any(status(fake, n).get("pendingMove") for n in NAMES)  # cleared as moves began
            assert all(move(fake, n)["target"] == S1 for n in placed)
            assert not any(move(fake, n) for n in NAMES if n not in placed)
            assert events(fake, "MoveRolledBack") == []

    with_fake_kube(body)


def test_a_pod_that_is_not_ready_again_does_not_stop_a_move_already_holding() -> None:
    async def body(fake: FakeKube) -> None:
        async with operator(fake, Clock()):
            for name in NAMES:
                await fake.put(TENANTS, tenant(name))
            await fake.wait_for(lambda: all(status(fake, n).get("shard") == S0 for n in NAMES))
            await fake.put(PODS, ready_pod(S1))
            sts = fake.get(STATEFULSETS, "tensorwasm-shard")
            assert sts is not None
            await fake.put(STATEFULSETS, {**sts, "spec": {**sts["spec"], "replicas": 2}})
            movers = await fake.wait_for(lambda: [n for n in NAMES if move(fake, n)] or None)
            # The gate is only for starting: a started move goes on through its own timeout rules.
            await fake.put_status(PODS, S1, ready_pod(S1, ready=False)["status"])
            for name in movers:
                await fake.put_status(SNAPSHOTS, move(fake, name)["snapshot"], {"phase": "Ready"})
            await fake.wait_for(lambda: all(move(fake, n).get("phase") == "Restoring" for n in movers))
            for name in movers:
                await fake.put_status(TENANTS, name, {"runtime": {"shard": S1, "loaded": True}})
            await fake.wait_for(lambda: all(not move(fake, n) and selected(fake, n) == S1 for n in movers))

    with_fake_kube(body)
