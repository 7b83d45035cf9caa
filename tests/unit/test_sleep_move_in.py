"""A sleep record never stands in for a move's Snapshot, and a tenant held at a move barrier is not
put to sleep (a real shard, CPU backend, tests/fixtures/counter.wat: its total is its state).

The sleep store is shared by the shards, and its records are keyed by the Tenant's uid: a record
left by a crash (or written by the source while it held the tenant) must not resurrect older state
on the shard the tenant moves to, whose start restores the move's Snapshot (`Shard.prepare`)."""

# ruff: noqa: F811  (pytest fixtures are imported by name and taken as parameters)
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorwasm.runtime.shard import ASLEEP, LOADED
from tensorwasm.runtime.sleep import SleepRecords, sleep_key
from tensorwasm.runtime.snapshots.store import SnapshotStore
from tensorwasm.runtime.tenancy.config import TenantConfig
from tests.runtime_fixtures import RuntimeServer, runtime_server, start_runtime_server  # noqa: F401
from tests.unit.test_runtime_sleep import add, counter, reason, wait_for


def asleep_at(store: Path, cfg: TenantConfig, total: int) -> None:
    """A shard serves `cfg` up to `total`, puts it to sleep and stops: its record stays."""
    first = start_runtime_server([cfg], sleep_store=SnapshotStore(store))
    server = next(first)
    assert add(server, cfg, total) == total
    assert server.run(server.shard.sleep(cfg.name))
    for _ in first:
        pass
    assert SleepRecords(SnapshotStore(store)).read(sleep_key(cfg)) is not None


def test_a_tenant_moving_here_is_restored_from_its_snapshot_not_from_a_sleep_record(tmp_path: Path) -> None:
    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    asleep_at(store, alpha, 9)  # older state: the move's Snapshot stands for what came after
    prepared: list[str] = []

    async def restore_move_snapshot(config: TenantConfig, pool: Any, device: Any) -> str:
        prepared.append(config.name)  # the move Snapshot's restore (here: the module's fresh state)
        return "restored move snapshot"

    moving = start_runtime_server(
        [alpha], sleep_store=SnapshotStore(store), prepare=restore_move_snapshot, moving_in=lambda c: True
    )
    server = next(moving)
    try:
        assert reason(server, "alpha") == LOADED and prepared == ["alpha"]
        assert add(server, alpha, 1) == 1  # the record's 9 did not come back
        assert SleepRecords(SnapshotStore(store)).read(sleep_key(alpha)) is None
    finally:
        for _ in moving:
            pass
    # Started again once the move is over: no record, so nothing older is served either.
    again = start_runtime_server([alpha], sleep_store=SnapshotStore(store))
    server = next(again)
    try:
        assert reason(server, "alpha") == LOADED
    finally:
        for _ in again:
            pass


def test_a_tenant_not_moving_here_still_sleeps_on_in_its_record(tmp_path: Path) -> None:
    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    asleep_at(store, alpha, 9)
    restarted = start_runtime_server([alpha], sleep_store=SnapshotStore(store), moving_in=lambda c: False)
    server = next(restarted)
    try:
        assert reason(server, "alpha") == ASLEEP
        assert add(server, alpha, 1) == 10
    finally:
        for _ in restarted:
            pass


def test_a_tenant_held_at_a_move_barrier_is_not_put_to_sleep(
    runtime_server: Callable[..., RuntimeServer], tmp_path: Path
) -> None:
    # Never called. `held` is held long before its 3 s are up; the two load concurrently (either may
    # be first by a few ms), and `held`'s idle.after is 200 ms shorter than `other`'s, so the scan pass
    # that puts `other` to sleep finds `held` idle past its own idle.after too.
    held, other = counter("held", after="3s"), counter("other", after="3200ms")
    server = runtime_server([held, other], sleep_store=SnapshotStore(tmp_path / "store"))
    sleepers = {n: server.shard.served[n].sleeper for n in ("held", "other")}
    assert sleepers["held"] is not None and sleepers["other"] is not None
    assert server.shard.hold("held")
    assert sleepers["held"].last_used() <= sleepers["other"].last_used() + 0.2
    wait_for(lambda: reason(server, "other") == ASLEEP)
    assert not server.shard.served["held"].asleep
    server.shard.release("held")  # the move rolled back: it sleeps as usual again
    wait_for(lambda: reason(server, "held") == ASLEEP)


def test_the_kubernetes_source_says_moving_here_only_for_a_move_to_this_shard_with_a_snapshot() -> None:
    from tensorwasm.runtime.settings import RuntimeSettings
    from tensorwasm.runtime.sources.kube import ClusterView, KubeSource

    source = KubeSource(RuntimeSettings(namespace="ns", shard_name="shard-1"))

    def tenant(name: str, move: dict[str, str] | None) -> dict[str, Any]:
        return {"metadata": {"name": name}, "status": {"move": move} if move is not None else {}}

    source._view = ClusterView([
        tenant("in", {"target": "shard-1", "snapshot": "in-move-1"}),
        tenant("out", {"target": "shard-2", "snapshot": "out-move-1"}),
        tenant("uncaptured", {"target": "shard-1"}),  # no Snapshot to restore: its record may serve
        tenant("settled", None),
    ])  # fmt: skip
    verdicts = {n: source._moving_here(counter(n)) for n in ("in", "out", "uncaptured", "settled", "absent")}
    assert verdicts == {"in": True, "out": False, "uncaptured": False, "settled": False, "absent": False}
