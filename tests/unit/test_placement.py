"""Placement: rendezvous hashing with capacity and bounded load (pure, no cluster)."""

from __future__ import annotations

import pytest

from tensorwasm.operator.placement import LOAD_FACTOR, Decision, Ledger, Move, ranked, score
from tensorwasm.planner.admission import ShardCapacity, TenantDemand

BIG = ShardCapacity(gpu_memory_bytes=64 << 30, sm_percent=100, host_memory_bytes=256 << 30, max_tenants=1000)
SMALL = TenantDemand(gpu_memory_bytes=0, sm_percent=0, host_memory_bytes=1 << 20)
NAMES = [f"tenant-{i:03d}" for i in range(300)]


def fill(ledger: Ledger, names: list[str], demand: TenantDemand = SMALL) -> None:
    for name in names:
        assert ledger.place(name, demand).shard is not None


def test_score_is_stable_across_runs() -> None:
    # A fixed value: placement must not depend on PYTHONHASHSEED or the process.
    assert score("alpha", 0) == score("alpha", 0)
    assert score("alpha", 0) != score("alpha", 1)
    assert ranked("alpha", 3) == sorted(range(3), key=lambda s: score("alpha", s), reverse=True)


def test_even_spread_within_load_factor() -> None:
    ledger = Ledger(BIG, 3)
    fill(ledger, NAMES[:50])
    counts = ledger.counts()
    assert sum(counts) == 50
    assert max(counts) <= -(-LOAD_FACTOR * 50 // 3)
    assert min(counts) >= 50 // 3 - 4


def test_placed_tenant_is_sticky() -> None:
    ledger = Ledger(BIG, 3)
    first = ledger.place("alpha", SMALL).shard
    fill(ledger, NAMES[:30])
    assert ledger.place("alpha", SMALL) == Decision(first)


def test_grow_moves_at_most_a_fair_share_and_only_onto_the_new_shard() -> None:
    ledger = Ledger(BIG, 2)
    fill(ledger, NAMES[:50])
    before = ledger.tenants()
    moves = ledger.resize(3)
    assert 0 < len(moves) <= 50 // 3
    assert all(m.target == 2 and m.source == before[m.tenant] for m in moves)
    after = ledger.tenants()
    assert sum(1 for n in before if before[n] != after[n]) == len(moves)


def test_shrink_moves_only_the_removed_shards_tenants() -> None:
    ledger = Ledger(BIG, 3)
    fill(ledger, NAMES[:50])
    before = ledger.tenants()
    moves = ledger.resize(2)
    on_removed = {n for n, s in before.items() if s == 2}
    assert {m.tenant for m in moves} == on_removed
    assert all(m.target in (0, 1) for m in moves)
    after = ledger.tenants()
    assert all(after[n] == before[n] for n in before if n not in on_removed)


def test_insufficient_capacity_names_the_binding_resource() -> None:
    cap = ShardCapacity(gpu_memory_bytes=3 << 30, sm_percent=100, host_memory_bytes=64 << 30, max_tenants=10)
    ledger = Ledger(cap, 2)
    gpu = TenantDemand(gpu_memory_bytes=1 << 30, sm_percent=10, host_memory_bytes=1 << 20)
    fill(ledger, ["a", "b", "c", "d"], gpu)  # 2 x 1Gi per shard = 3Gi with 1.5x headroom
    decision = ledger.place("e", gpu)
    assert decision.shard is None
    assert decision.resource == "gpuMemory"
    assert "insufficient gpuMemory" in decision.message and "no shard of 2" in decision.message
    assert ledger.shard_of("e") is None


def test_max_tenants_binds() -> None:
    cap = ShardCapacity(gpu_memory_bytes=1 << 30, sm_percent=100, host_memory_bytes=64 << 30, max_tenants=2)
    ledger = Ledger(cap, 1)
    fill(ledger, ["a", "b"])
    assert ledger.place("c", SMALL).resource == "tenants"
    ledger.release("a")
    assert ledger.place("c", SMALL).shard == 0


def test_no_shards_is_reported() -> None:
    decision = Ledger(BIG, 0).place("a", SMALL)
    assert decision == Decision(None, "shards", decision.message) and "0 replicas" in decision.message


def test_preferred_shard_wins_when_it_fits() -> None:
    ledger = Ledger(BIG, 4)
    assert ledger.place("alpha", SMALL, preferred=3).shard == 3


def test_shrink_with_no_room_leaves_tenants_unplaced() -> None:
    cap = ShardCapacity(gpu_memory_bytes=1 << 30, sm_percent=100, host_memory_bytes=64 << 30, max_tenants=2)
    ledger = Ledger(cap, 2)
    fill(ledger, ["a", "b", "c", "d"])
    moves = ledger.resize(1)
    assert [m.target for m in moves] == [None, None]
    assert sum(ledger.counts()) == 2


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="shards must be >= 0"):
        Ledger(BIG, -1)
    with pytest.raises(ValueError, match="outside"):
        Ledger(BIG, 2).assign("a", 5, SMALL)


def test_move_record_shape() -> None:
    ledger = Ledger(BIG, 1)
    fill(ledger, ["a"])
    assert ledger.resize(0) == [Move("a", 0, None)]


TWO = ShardCapacity(gpu_memory_bytes=1 << 30, sm_percent=100, host_memory_bytes=64 << 30, max_tenants=2)


def test_a_tenant_placed_away_from_the_shard_serving_it_counts_on_both_until_it_has_moved() -> None:
    ledger = Ledger(TWO, 2)
    ledger.assign("a", 0, SMALL)
    ledger.assign("b", 0, SMALL)
    ledger.assign("a", 1, SMALL)  # placed on shard 1 (its move waits); shard 0 still serves it
    assert (ledger.shard_of("a"), ledger.serving("a"), ledger.counts()) == (1, 0, [2, 1])
    # Shard 0 is full while it serves a: a new tenant preferring it goes to shard 1.
    assert ledger.place("c", SMALL, preferred=0) == Decision(1)
    assert ledger.place("d", SMALL).shard is None  # nowhere: shard 1 holds a and c
    ledger.serve("a", 1)  # the move is done
    assert (ledger.serving("a"), ledger.counts()) == (1, [1, 2])
    assert ledger.place("d", SMALL) == Decision(0)


def test_going_back_or_leaving_counts_the_tenant_once_or_not_at_all() -> None:
    ledger = Ledger(TWO, 2)
    ledger.assign("a", 0, SMALL)
    ledger.assign("a", 1, SMALL)
    ledger.assign("a", 0, SMALL)  # back on the shard serving it (a rollback)
    assert (ledger.serving("a"), ledger.counts()) == (0, [1, 0])
    ledger.assign("a", 1, SMALL)
    ledger.serve("a", 7)  # a shard outside the set (scaled in) holds nothing of the ledger's
    assert (ledger.serving("a"), ledger.counts()) == (1, [0, 1])
    ledger.assign("b", 0, SMALL)
    ledger.assign("b", 1, SMALL)
    assert ledger.release("b") == 1 and ledger.counts() == [0, 1]


def test_grow_keeps_the_moved_tenants_counted_on_their_source_and_shrink_drops_a_removed_source() -> None:
    ledger = Ledger(BIG, 2)
    fill(ledger, NAMES[:50])
    before = ledger.counts()
    moves = ledger.resize(3)
    assert moves and ledger.counts()[:2] == before and ledger.counts()[2] == len(moves)
    assert all(ledger.serving(m.tenant) == m.source for m in moves)
    ledger.resize(2)  # back to 2 before any move finished: shard 2's tenants are placed again
    assert sum(ledger.counts()) == 50 and all(ledger.serving(m.tenant) == m.source for m in moves)
