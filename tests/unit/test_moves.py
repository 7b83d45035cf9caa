"""The move protocol on the operator's side: Holding -> Restoring -> done, and every rollback.

The real Reconciler, SnapshotMove, Ledger and tensorwasm.kube client against tests/fake_kube.py;
the test plays the shards' part (a source capturing the move Snapshot, a target reporting the
tenant loaded) by writing what they write. The clock is the test's: a timeout passes only when the
test moves it, so nothing depends on how fast this machine is.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any

from tensorwasm.operator.reconciler import Reconciler
from tests.fake_kube import FakeKube, with_fake_kube
from tests.unit.test_reconciler_inprocess import (
    NS,
    SERVICES,
    SETTINGS,
    SNAPSHOTS,
    STATEFULSETS,
    TENANTS,
    status,
    tenant,
)
from tests.unit.test_reconciler_inprocess import operator as reconciler_running

S0, S1 = "tensorwasm-shard-0", "tensorwasm-shard-1"
EVENTS, PODS = f"/api/v1/namespaces/{NS}/events", f"/api/v1/namespaces/{NS}/pods"
ONE_SHARD = replace(SETTINGS, shards=1, move_snapshot_timeout_s=120)
NAMES = [f"t{i}" for i in range(8)]


class Clock:
    def __init__(self) -> None:
        self.seconds = 0

    def __call__(self) -> str:
        return f"2026-11-29T12:{self.seconds // 60:02d}:{self.seconds % 60:02d}Z"


def ready_pod(name: str, ready: bool = True) -> dict[str, Any]:
    """A shard pod as the kubelet reports it (the move starts only once its target is Ready)."""
    condition = {"type": "Ready", "status": "True" if ready else "False"}
    return {"metadata": {"name": name}, "status": {"conditions": [condition]}}


def operator(fake: FakeKube, clock: Clock, shards: int = 1) -> AbstractAsyncContextManager[Reconciler]:
    return reconciler_running(fake, replace(ONE_SHARD, shards=shards), clock)


def selected(fake: FakeKube, name: str) -> str:
    service = fake.get(SERVICES, f"tw-{name}") or {}
    return str(service.get("spec", {}).get("selector", {}).get("statefulset.kubernetes.io/pod-name"))


def move(fake: FakeKube, name: str) -> dict[str, Any]:
    return dict(status(fake, name).get("move") or {})


async def placed_then_grown(fake: FakeKube, names: list[str] = NAMES, **spec: Any) -> list[str]:
    """Tenants Placed on one shard, then the StatefulSet scaled to 2; the tenants that start moving."""
    for name in names:
        await fake.put(TENANTS, tenant(name, **spec))
    await fake.wait_for(lambda: all(status(fake, n).get("shard") == S0 for n in names))
    await fake.put(PODS, ready_pod(S1))
    sts = fake.get(STATEFULSETS, "tensorwasm-shard")
    assert sts is not None
    await fake.put(STATEFULSETS, {**sts, "spec": {**sts["spec"], "replicas": 2}})
    await fake.wait_for(lambda: any(move(fake, n) for n in names))
    await asyncio.sleep(0)  # let the other reconciles of the resize run too
    movers: list[str] = await fake.wait_for(lambda: [n for n in names if move(fake, n)] or None)
    return movers


def events(fake: FakeKube, reason: str) -> list[dict[str, Any]]:
    return [e for e in fake.items(EVENTS) if e.get("reason") == reason]


def test_a_move_holds_on_the_source_restores_on_the_target_then_repoints_the_service() -> None:
    async def body(fake: FakeKube) -> None:
        async with operator(fake, Clock()):
            movers = await placed_then_grown(fake)
            for name in movers:
                record = move(fake, name)
                assert (record["phase"], record["source"], record["target"]) == ("Holding", S0, S1)
                # Held on the source: status.shard and the Service stay there until the capture.
                assert status(fake, name)["shard"] == S0 and selected(fake, name) == S0
                snapshot = fake.get(SNAPSHOTS, record["snapshot"])
                assert (
                    snapshot is not None and snapshot["metadata"]["labels"]["tensorwasm.io/purpose"] == "move"
                )
                await fake.put_status(SNAPSHOTS, record["snapshot"], {"phase": "Ready", "shard": S0})
            # Captured: the target restores it while the Service still selects the source.
            await fake.wait_for(lambda: all(move(fake, n).get("phase") == "Restoring" for n in movers))
            for name in movers:
                assert status(fake, name)["shard"] == S1 and selected(fake, name) == S0
            # The target reports the tenant loaded (restore included): now the Service moves.
            for name in movers:
                await fake.put_status(TENANTS, name, {"runtime": {"shard": S1, "loaded": True}})
            await fake.wait_for(lambda: all(not move(fake, n) and selected(fake, n) == S1 for n in movers))
            assert all(status(fake, n)["shard"] == S1 for n in movers)
            assert all(selected(fake, n) == S0 for n in NAMES if n not in movers), "only movers move"
            assert events(fake, "MoveRolledBack") == []

    with_fake_kube(body)


def test_a_move_whose_snapshot_is_not_ready_in_time_rolls_back_to_the_source_with_an_event() -> None:
    async def body(fake: FakeKube) -> None:
        clock = Clock()
        async with operator(fake, clock) as reconciler:
            movers = await placed_then_grown(fake)
            snapshots = {move(fake, n)["snapshot"] for n in movers}
            clock.seconds += 121  # no shard ever captures: the timeout passes
            await fake.wait_for(lambda: not any(move(fake, n) for n in movers))
            await reconciler.drain()
            for name in movers:
                assert status(fake, name)["shard"] == S0 and selected(fake, name) == S0
            # The unfinished Snapshots are gone (a source serving again must never capture them),
            # each rollback said so once, and no move starts again by itself.
            assert not snapshots & {s["metadata"]["name"] for s in fake.items(SNAPSHOTS)}
            rolled = events(fake, "MoveRolledBack")
            assert sorted(e["involvedObject"]["name"] for e in rolled) == sorted(movers)
            assert all(e["type"] == "Warning" and "not Ready after 121s" in e["message"] for e in rolled)
            assert not any(move(fake, n) for n in NAMES)

    with_fake_kube(body)


def test_a_failed_capture_or_a_silent_target_rolls_back_and_the_source_serves_again() -> None:
    async def body(fake: FakeKube) -> None:
        clock = Clock()
        async with operator(fake, clock):
            movers = await placed_then_grown(fake)
            failed, *rest = movers
            await fake.put_status(SNAPSHOTS, move(fake, failed)["snapshot"], {"phase": "Failed",
                                  "message": "disk full"})  # fmt: skip
            for name in rest:
                await fake.put_status(SNAPSHOTS, move(fake, name)["snapshot"], {"phase": "Ready"})
            await fake.wait_for(lambda: not move(fake, failed))
            assert status(fake, failed)["shard"] == S0
            assert "disk full" in events(fake, "MoveRolledBack")[0]["message"]
            if not rest:
                return
            await fake.wait_for(lambda: all(move(fake, n).get("phase") == "Restoring" for n in rest))
            clock.seconds += 121  # the target never reports the tenant loaded
            await fake.wait_for(lambda: not any(move(fake, n) for n in rest))
            for name in rest:  # back on the source, whose restore brings the captured state
                assert status(fake, name)["shard"] == S0 and selected(fake, name) == S0
            assert len(events(fake, "MoveRolledBack")) == len(movers)

    with_fake_kube(body)


def test_a_restarted_operator_resumes_a_move_from_status() -> None:
    async def body(fake: FakeKube) -> None:
        clock = Clock()
        async with operator(fake, clock):
            movers = await placed_then_grown(fake)
            for name in movers:
                await fake.put_status(SNAPSHOTS, move(fake, name)["snapshot"], {"phase": "Ready"})
            await fake.wait_for(lambda: all(move(fake, n).get("phase") == "Restoring" for n in movers))
        async with operator(fake, clock):  # a new process: the same moves, from status.move
            for name in movers:
                await fake.put_status(TENANTS, name, {"runtime": {"shard": S1, "loaded": True}})
            await fake.wait_for(lambda: all(not move(fake, n) and selected(fake, n) == S1 for n in movers))
            assert events(fake, "MoveRolledBack") == []

    with_fake_kube(body)


def test_without_the_onmove_policy_a_move_skips_the_capture_but_still_waits_for_the_target() -> None:
    async def body(fake: FakeKube) -> None:
        async with operator(fake, Clock()):
            movers = await placed_then_grown(fake, snapshot={"policy": "Manual"})
            for name in movers:
                assert move(fake, name)["phase"] == "Restoring" and "snapshot" not in move(fake, name)
                assert status(fake, name)["shard"] == S1 and selected(fake, name) == S0
            assert fake.items(SNAPSHOTS) == []
            for name in movers:
                await fake.put_status(TENANTS, name, {"runtime": {"shard": S1, "loaded": True}})
            await fake.wait_for(lambda: all(not move(fake, n) and selected(fake, n) == S1 for n in movers))

    with_fake_kube(body)


def test_a_scaled_in_shard_hands_its_tenants_off_while_its_pod_terminates() -> None:
    async def body(fake: FakeKube) -> None:
        await fake.put(PODS, {"metadata": {"name": S1}})  # terminating, still serving
        clock = Clock()
        async with operator(fake, clock, shards=2):
            for name in NAMES:
                await fake.put(TENANTS, tenant(name))
            await fake.wait_for(lambda: all(status(fake, n).get("shard") for n in NAMES))
            leaving = [n for n in NAMES if status(fake, n)["shard"] == S1]
            assert leaving, "eight tenants spread over two shards"
            sts = fake.get(STATEFULSETS, "tensorwasm-shard")
            assert sts is not None
            await fake.put(STATEFULSETS, {**sts, "spec": {**sts["spec"], "replicas": 1}})
            # The removed shard's pod still runs: it holds and captures, as any source does.
            await fake.wait_for(lambda: all(move(fake, n).get("phase") == "Holding" for n in leaving))
            first, *rest = leaving
            assert move(fake, first)["source"] == S1 and selected(fake, first) == S1
            await fake.put_status(SNAPSHOTS, move(fake, first)["snapshot"], {"phase": "Ready"})
            await fake.wait_for(lambda: move(fake, first).get("phase") == "Restoring")
            await fake.put_status(TENANTS, first, {"runtime": {"shard": S0, "loaded": True}})
            await fake.wait_for(lambda: not move(fake, first) and selected(fake, first) == S0)
            # The pod is gone before the others were captured: they get a short wait, not the whole
            # timeout, then go on (there is nothing to roll back to) with a Warning each.
            await fake.remove(PODS, S1)
            clock.seconds += 11
            await fake.wait_for(lambda: all(not move(fake, n) and selected(fake, n) == S0 for n in rest))
            assert len(events(fake, "MovedWithoutCapture")) == len(rest)
            assert all(status(fake, n)["shard"] == S0 for n in NAMES)

    with_fake_kube(body)
