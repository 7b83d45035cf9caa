"""A placed Tenant whose spec becomes invalid keeps its shard: across an operator restart, and mid-move.

Review R3 K7 and K2 (f386721's rule: its shard refuses the spec too and sleeps it keeping state;
unplacing it looks like a move to the shard, which keeps nothing). The real Reconciler, SnapshotMove,
Ledger and kube client against tests/fake_kube.py; the test plays the shards and owns the clock.
"""

from __future__ import annotations

from typing import Any

from tensorwasm.api.tenant import parse_spec
from tensorwasm.operator.reconciler import INVALID_DEMAND
from tensorwasm.planner.admission import tenant_demand
from tests.fake_kube import FakeKube, with_fake_kube
from tests.unit.test_moves import S0, S1, Clock, events, move, operator, placed_then_grown, selected
from tests.unit.test_reconciler_inprocess import SNAPSHOTS, TENANTS, status, tenant
from tests.unit.test_reconciler_inprocess import operator as reconciler_running

INVALID = {"limits": {"timeoutMs": 700_000}}  # over the bound: the spec does not parse


def generation(fake: FakeKube, name: str) -> int:
    return int(((fake.get(TENANTS, name) or {}).get("metadata") or {}).get("generation") or 0)


def reconciled(fake: FakeKube, name: str) -> bool:
    """The operator has written status for the Tenant's current spec."""
    return status(fake, name).get("observedGeneration") == generation(fake, name)


def test_an_invalid_spec_keeps_its_shard_across_an_operator_restart() -> None:
    async def body(fake: FakeKube) -> None:
        async with reconciler_running(fake) as reconciler:
            await fake.put(TENANTS, tenant("a"))
            await fake.wait_for(lambda: status(fake, "a").get("phase") == "Placed")
            shard = status(fake, "a")["shard"]
            ordinal = reconciler.ledger.shard_of("a")
            await fake.put(TENANTS, tenant("a", **INVALID))
            await fake.wait_for(lambda: status(fake, "a").get("phase") == "Failed")
        async with reconciler_running(fake) as reconciler:  # the operator restarts
            assert reconciler.ledger.shard_of("a") == ordinal  # adopted before any handler runs
            assert reconciler.ledger.demand_of("a") == INVALID_DEMAND  # the last valid one died with it
            assert "a" not in reconciler._placements()  # the roll does not try to move it
            await fake.put(TENANTS, tenant("a", limits={"timeoutMs": 800_000}))  # still invalid
            await fake.wait_for(lambda: reconciled(fake, "a"))
            assert status(fake, "a")["phase"] == "Failed" and status(fake, "a")["shard"] == shard
            assert reconciler.ledger.shard_of("a") == ordinal
            await fake.put(TENANTS, tenant("a", limits={"timeoutMs": 2000}))  # fixed
            await fake.wait_for(lambda: reconciled(fake, "a") and status(fake, "a")["phase"] != "Failed")
            assert status(fake, "a")["shard"] == shard and reconciler.ledger.shard_of("a") == ordinal
            fixed = tenant_demand(parse_spec(tenant("a", limits={"timeoutMs": 2000})["spec"]))
            assert reconciler.ledger.demand_of("a") == fixed
            assert "a" in reconciler._placements()

    with_fake_kube(body)


def rolled_back_to_the_source(fake: FakeKube, names: list[str], reconciler: Any) -> None:
    for name in names:
        st = status(fake, name)
        assert st["phase"] == "Failed" and st["shard"] == S0 and not st.get("move"), st
        assert selected(fake, name) == S0 and reconciler.ledger.shard_of(name) == 0
        assert reconciler.ledger.serving(name) == 0
    rolled = events(fake, "MoveRolledBack")
    assert sorted(e["involvedObject"]["name"] for e in rolled) == sorted(names)
    assert all("its spec became invalid" in e["message"] for e in rolled)


def test_an_invalid_spec_while_holding_rolls_the_move_back_and_the_source_keeps_the_tenant() -> None:
    async def body(fake: FakeKube) -> None:
        async with operator(fake, Clock()) as reconciler:
            movers = await placed_then_grown(fake)
            name = movers[0]
            snapshot = move(fake, name)["snapshot"]
            assert move(fake, name)["phase"] == "Holding" and reconciler.ledger.shard_of(name) == 1
            await fake.put(TENANTS, tenant(name, **INVALID))
            await fake.wait_for(
                lambda: reconciled(fake, name) and status(fake, name).get("phase") == "Failed"
            )
            await reconciler.drain()
            rolled_back_to_the_source(fake, [name], reconciler)
            # Unfinished: deleted, so the source serving again never captures it later.
            assert snapshot not in {s["metadata"]["name"] for s in fake.items(SNAPSHOTS)}

    with_fake_kube(body)


def test_an_invalid_spec_while_restoring_rolls_back_to_the_source_which_holds_the_capture() -> None:
    async def body(fake: FakeKube) -> None:
        async with operator(fake, Clock()) as reconciler:
            movers = await placed_then_grown(fake)
            name = movers[0]
            snapshot = move(fake, name)["snapshot"]
            await fake.put_status(SNAPSHOTS, snapshot, {"phase": "Ready"})
            await fake.wait_for(lambda: move(fake, name).get("phase") == "Restoring")
            assert status(fake, name)["shard"] == S1
            await fake.put(TENANTS, tenant(name, **INVALID))
            await fake.wait_for(
                lambda: reconciled(fake, name) and status(fake, name).get("phase") == "Failed"
            )
            await reconciler.drain()
            rolled_back_to_the_source(fake, [name], reconciler)
            # Ready: kept, it is the state the source restores once the spec is fixed.
            assert snapshot in {s["metadata"]["name"] for s in fake.items(SNAPSHOTS)}

    with_fake_kube(body)
