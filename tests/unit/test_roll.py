"""The operator's shard roll (roll.py): a new revision replaces every shard pod, and at no moment is a
tenant's Service left selecting a pod that is not there.

The real Reconciler, ShardRoll, moves and kube client against tests/fake_kube.py. The test plays
what the project does not own or what runs elsewhere: the StatefulSet controller (pods for the
replicas, Ready, labelled with the revision; OnDelete: a deleted pod comes back on the new one) and
the shards (the source's capture of each move Snapshot, the target's report).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import replace
from typing import Any

from tensorwasm.operator.roll import ROLL_ANNOTATION
from tensorwasm.planner.admission import ShardCapacity
from tests.fake_kube import FakeKube, with_fake_kube
from tests.unit.test_moves import (
    EVENTS,
    NAMES,
    ONE_SHARD,
    PODS,
    S0,
    Clock,
    move,
    operator,
    placed_then_grown,
    selected,
)
from tests.unit.test_reconciler_inprocess import SNAPSHOTS, STATEFULSETS, TENANTS, status, tenant
from tests.unit.test_reconciler_inprocess import operator as reconciler_running

READY = {"conditions": [{"type": "Ready", "status": "True"}]}


async def pod(fake: FakeKube, name: str, revision: str) -> None:
    await fake.put(PODS, {"metadata": {"name": name, "labels": {"controller-revision-hash": revision}}})
    await fake.put_status(PODS, name, READY)


class Cluster:
    """The StatefulSet controller and the shards, as far as the operator can see them."""

    def __init__(self, fake: FakeKube, names: list[str] = NAMES) -> None:
        self.fake, self.names = fake, names
        self.gaps: list[str] = []
        self.deleted: list[str] = []
        self.blocked: set[str] = set()  # tenants whose source never captures (a long job holds it)

    async def run(self) -> None:
        fake = self.fake
        while True:
            sts = fake.get(STATEFULSETS, "tensorwasm-shard") or {}
            replicas = int(sts.get("spec", {}).get("replicas", 0))
            revision = str(sts.get("status", {}).get("updateRevision") or "r1")
            pods = {p["metadata"]["name"] for p in fake.items(PODS)}
            for ordinal in range(replicas):
                if f"tensorwasm-shard-{ordinal}" not in pods:
                    await pod(fake, f"tensorwasm-shard-{ordinal}", revision)
            serving = {selected(fake, n) for n in self.names}
            for name in pods:  # a scaled-in pod terminates once it has handed its tenants off
                if int(name.rsplit("-", 1)[1]) >= replicas and name not in serving:
                    self.deleted.append(name)
                    await fake.remove(PODS, name)
            for name in self.names:
                record = move(fake, name)
                holding = record.get("phase") == "Holding" and name not in self.blocked
                if holding and fake.get(SNAPSHOTS, record["snapshot"]):
                    await fake.put_status(SNAPSHOTS, record["snapshot"], {"phase": "Ready"})
                elif record.get("phase") == "Restoring":
                    await fake.put_status(
                        TENANTS, name, {"runtime": {"shard": record["target"], "loaded": True}}
                    )
                service_pod = selected(fake, name)
                if fake.get(TENANTS, name) and service_pod != "None" and not fake.get(PODS, service_pod):
                    self.gaps.append(f"{name} -> {service_pod}")
            await asyncio.sleep(0.01)


def test_a_new_revision_rolls_the_only_shard_through_a_surge_shard_without_a_gap() -> None:
    async def body(fake: FakeKube) -> None:
        await pod(fake, S0, "r1")
        cluster = Cluster(fake)
        async with operator(fake, Clock()):
            for name in NAMES:
                await fake.put(TENANTS, tenant(name))
            await fake.wait_for(lambda: all(status(fake, n).get("shard") == S0 for n in NAMES))
            player = asyncio.create_task(cluster.run())
            try:
                # helm upgrade: the operator applied a new template; the StatefulSet controller
                # names its revision, and (OnDelete) replaces nothing by itself.
                await fake.put_status(STATEFULSETS, "tensorwasm-shard", {"updateRevision": "r2"})
                sts = await fake.wait_for(
                    lambda: (
                        (s := fake.get(STATEFULSETS, "tensorwasm-shard"))
                        and ROLL_ANNOTATION in s["metadata"].get("annotations", {})
                        and s
                    )
                )
                assert json.loads(sts["metadata"]["annotations"][ROLL_ANNOTATION]) == {"replicas": 1}
                assert sts["spec"]["replicas"] == 2 and sts["spec"]["updateStrategy"] == {"type": "OnDelete"}
                # An autoscaler scales it back to 1 mid-roll: the roll needs its surge and takes it back.
                await fake.put(
                    STATEFULSETS, {"metadata": {"name": "tensorwasm-shard"}, "spec": {"replicas": 1}}
                )
                await fake.wait_for(
                    lambda: (s := fake.get(STATEFULSETS, "tensorwasm-shard")) and s["spec"]["replicas"] == 2,
                    60,
                )
                # Shard 0 is drained onto the surge shard, replaced on r2, and the surge goes.
                await fake.wait_for(
                    lambda: (
                        (s := fake.get(STATEFULSETS, "tensorwasm-shard"))
                        and s["spec"]["replicas"] == 1
                        and ROLL_ANNOTATION not in s["metadata"].get("annotations", {})
                    ),
                    60,
                )
                await fake.wait_for(
                    lambda: all(status(fake, n).get("shard") == S0 and not move(fake, n) for n in NAMES), 60
                )
                await fake.wait_for(lambda: not fake.get(PODS, "tensorwasm-shard-1"), 60)  # the surge went
            finally:
                player.cancel()
        new = fake.get(PODS, S0)
        assert new is not None and new["metadata"]["labels"]["controller-revision-hash"] == "r2"
        assert cluster.gaps == [], "a Service selected a pod that was not there"
        assert all(selected(fake, n) == S0 for n in NAMES)

    with_fake_kube(body)


def roll_over(fake: FakeKube, replicas: int) -> bool:
    """The roll has ended: the StatefulSet back at `replicas`, its roll annotation gone, and the
    surge shard's pod (ordinal `replicas`) removed."""
    sts = fake.get(STATEFULSETS, "tensorwasm-shard")
    return bool(
        sts
        and sts["spec"]["replicas"] == replicas
        and ROLL_ANNOTATION not in sts["metadata"].get("annotations", {})
        and not fake.get(PODS, f"tensorwasm-shard-{replicas}")
    )


def occupancy_peaks(fake: FakeKube) -> Counter[str]:
    """The most tenants each shard held at any moment, replayed from every Tenant write in order.

    A tenant counts on its status.shard, and on a move's target from the move's start (the target
    restores it while the source may still hold it): the conservative view of a shard's memory."""
    bodies: dict[str, dict[str, Any]] = {}
    peaks: Counter[str] = Counter()
    for event in fake.events:
        if event.collection != TENANTS:
            continue
        if event.type == "DELETED":
            bodies.pop(event.obj["metadata"]["name"], None)
            continue
        bodies[event.obj["metadata"]["name"]] = event.obj
        held: Counter[str] = Counter()
        for body in bodies.values():
            st = body.get("status") or {}
            shards = {st.get("shard"), (st.get("move") or {}).get("target")} - {None}
            held.update(str(shard) for shard in shards)
        for shard, count in held.items():
            peaks[shard] = max(peaks[shard], count)
    return peaks


def test_a_roll_of_three_shards_near_capacity_spreads_the_drained_tenants_and_overfills_none() -> None:
    # Three shards of three tenants each hold eight: 8 of 9 places. Draining a shard onto the
    # surge shard alone would put up to 3 + 3 + 2 tenants there; the roll must use the replaced
    # shards (and any other with room) and never place past a shard's capacity.
    capacity = ShardCapacity(16 << 30, 100, 32 << 30, max_tenants=3)
    settings = replace(ONE_SHARD, shards=3, shard_capacity=capacity)

    async def body(fake: FakeKube) -> None:
        cluster = Cluster(fake)
        player = asyncio.create_task(cluster.run())
        try:
            async with reconciler_running(fake, settings, Clock()) as reconciler:
                for name in NAMES:
                    await fake.put(TENANTS, tenant(name))
                await fake.wait_for(lambda: all(status(fake, n).get("phase") == "Placed" for n in NAMES), 60)
                before = Counter(status(fake, n)["shard"] for n in NAMES)
                assert sorted(before.values()) == [2, 3, 3], before
                await fake.put_status(STATEFULSETS, "tensorwasm-shard", {"updateRevision": "r2"})
                await fake.wait_for(
                    lambda: (
                        (s := fake.get(STATEFULSETS, "tensorwasm-shard"))
                        and ROLL_ANNOTATION in s["metadata"].get("annotations", {})
                    ),
                    60,
                )
                await fake.wait_for(
                    lambda: roll_over(fake, 3) and all(not move(fake, n) for n in NAMES),
                    120,
                )
                moved = [
                    s
                    for s in fake.items(SNAPSHOTS)
                    if s["metadata"]["labels"]["tensorwasm.io/purpose"] == "move"
                ]
                assert moved and not reconciler.mover._created  # type: ignore[attr-defined]  # bounded
        finally:
            player.cancel()
        for ordinal in range(3):
            pod_ = fake.get(PODS, f"tensorwasm-shard-{ordinal}")
            assert pod_ is not None and pod_["metadata"]["labels"]["controller-revision-hash"] == "r2"
        assert cluster.gaps == [], "a Service selected a pod that was not there"
        assert all(status(fake, n)["shard"] in {f"tensorwasm-shard-{i}" for i in range(3)} for n in NAMES)
        peaks = occupancy_peaks(fake)
        assert peaks["tensorwasm-shard-3"] >= 1, peaks  # the surge shard took part
        assert max(peaks.values()) <= 3, f"a shard held more tenants than its capacity: {peaks}"
        assert not [e for e in fake.items(EVENTS) if e["reason"] == "RollWaitingForRoom"]

    with_fake_kube(body)


def test_a_roll_whose_drained_tenants_fit_nowhere_waits_says_so_and_goes_on_once_room_frees() -> None:
    # Four tenants placed on one shard by an operator allowing four; restarted allowing two (the
    # placements stay: sticky). The surge shard takes two, so two of shard 0's fit nowhere.
    roomy = replace(ONE_SHARD, shard_capacity=ShardCapacity(16 << 30, 100, 32 << 30, max_tenants=4))
    tight = replace(roomy, shard_capacity=replace(roomy.shard_capacity, max_tenants=2))
    names = NAMES[:4]

    async def body(fake: FakeKube) -> None:
        cluster = Cluster(fake)
        player = asyncio.create_task(cluster.run())
        try:
            async with reconciler_running(fake, roomy, Clock()):
                for name in names:
                    await fake.put(TENANTS, tenant(name))
                await fake.wait_for(lambda: all(status(fake, n).get("shard") == S0 for n in names), 60)
            async with reconciler_running(fake, tight, Clock()):
                await fake.put_status(STATEFULSETS, "tensorwasm-shard", {"updateRevision": "r2"})
                waiting = await fake.wait_for(
                    lambda: [e for e in fake.items(EVENTS) if e["reason"] == "RollWaitingForRoom"], 60
                )
                assert waiting[0]["type"] == "Warning"
                assert waiting[0]["involvedObject"]["kind"] == "StatefulSet"
                assert "2 tenant(s) of tensorwasm-shard-0" in waiting[0]["message"]
                stuck = sorted(n for n in names if status(fake, n)["shard"] == S0 and not move(fake, n))
                assert len(stuck) == 2, stuck
                # Waiting, not replacing: shard 0 still runs the old revision and nothing overfills.
                pod_ = fake.get(PODS, S0)
                assert pod_ is not None and pod_["metadata"]["labels"]["controller-revision-hash"] == "r1"
                assert occupancy_peaks(fake)["tensorwasm-shard-1"] <= 2
                # Room frees (the two stuck tenants are deleted): the roll goes on and finishes.
                for name in stuck:
                    await fake.remove(TENANTS, name)
                await fake.wait_for(
                    lambda: roll_over(fake, 1),
                    120,
                )
                await fake.wait_for(lambda: all(not move(fake, n) for n in names if fake.get(TENANTS, n)), 60)
        finally:
            player.cancel()
        pod_ = fake.get(PODS, S0)
        assert pod_ is not None and pod_["metadata"]["labels"]["controller-revision-hash"] == "r2"
        assert cluster.gaps == [], "a Service selected a pod that was not there"
        assert occupancy_peaks(fake)["tensorwasm-shard-1"] == 2  # the surge shard: full, never over

    with_fake_kube(body)


class Scheduled:
    """Every loop.call_later while installed; `pending(match)` counts those not run nor cancelled."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.handles: list[tuple[float, tuple[Any, ...], asyncio.TimerHandle]] = []
        real = self.loop.call_later

        def call_later(delay: float, callback: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
            handle = real(delay, callback, *args, **kw)
            self.handles.append((delay, args, handle))
            return handle

        self.loop.call_later = call_later  # type: ignore[method-assign,assignment]

    def pending(self, delay: float, args: tuple[Any, ...] = ()) -> int:
        now = self.loop.time()
        return sum(
            1 for d, a, h in self.handles if d == delay and a == args and not h.cancelled() and h.when() > now
        )

    def close(self) -> None:
        del self.loop.call_later  # the class's method again


def test_many_statefulset_events_during_a_roll_leave_one_scheduled_roll_tick() -> None:
    # No tenants and a surge shard that never comes up: the roll waits, and each event ticks it.
    slow = replace(ONE_SHARD, reconcile_retry_s=60)  # nothing scheduled runs during the test

    async def body(fake: FakeKube) -> None:
        await pod(fake, S0, "r1")
        scheduled = Scheduled()
        try:
            async with reconciler_running(fake, slow, Clock()) as reconciler:
                await fake.put_status(STATEFULSETS, "tensorwasm-shard", {"updateRevision": "r2"})
                await fake.wait_for(
                    lambda: (s := fake.get(STATEFULSETS, "tensorwasm-shard")) and s["spec"]["replicas"] == 2
                )
                for _ in range(20):  # the StatefulSet controller's status writes, a pod's readiness...
                    async with reconciler._roll_lock:  # a tick the watcher started is over: ours runs
                        pass
                    sts = fake.get(STATEFULSETS, "tensorwasm-shard")
                    assert sts is not None
                    await reconciler.on_statefulset("MODIFIED", sts)
                assert scheduled.pending(60) == 1, f"{scheduled.pending(60)} roll ticks scheduled"
        finally:
            scheduled.close()

    with_fake_kube(body)


def test_many_reconciles_of_a_tenant_whose_move_waits_leave_one_scheduled_retry() -> None:
    # A move held for its Snapshot asks to be reconciled again every retry period; every watch
    # event meanwhile (a shard's status write, the Snapshot's) reconciles it too.
    slow = replace(ONE_SHARD, reconcile_retry_s=60)  # nothing scheduled runs during the test

    async def body(fake: FakeKube) -> None:
        scheduled = Scheduled()
        try:
            async with reconciler_running(fake, slow, Clock()) as reconciler:
                movers = await placed_then_grown(fake, NAMES[:4])
                name = movers[0]
                assert move(fake, name)["phase"] == "Holding"
                for _ in range(20):
                    await reconciler.reconcile(name)
                assert scheduled.pending(60, (name,)) == 1, f"{scheduled.pending(60, (name,))} retries"
                await fake.remove(TENANTS, name)  # forgotten: its retry goes too
                await fake.wait_for(lambda: fake.get(TENANTS, name) is None)
                await reconciler.drain()
                assert scheduled.pending(60, (name,)) == 0
        finally:
            scheduled.close()

    with_fake_kube(body)


def test_a_malformed_roll_annotation_is_removed_with_an_error_and_the_roll_goes_on(caplog: Any) -> None:
    async def body(fake: FakeKube) -> None:
        await pod(fake, S0, "r1")
        async with operator(fake, Clock()):
            sts = fake.get(STATEFULSETS, "tensorwasm-shard")
            assert sts is not None
            meta = {**sts["metadata"], "annotations": {ROLL_ANNOTATION: '{"replicas": "one"'}}
            await fake.put(STATEFULSETS, {**sts, "metadata": meta})
            await fake.put_status(STATEFULSETS, "tensorwasm-shard", {"updateRevision": "r2"})
            # Repaired, then a fresh roll records the replica count it finds and surges.
            await fake.wait_for(
                lambda: (
                    (s := fake.get(STATEFULSETS, "tensorwasm-shard"))
                    and s["metadata"].get("annotations", {}).get(ROLL_ANNOTATION) == '{"replicas": 1}'
                    and s["spec"]["replicas"] == 2
                ),
                60,
            )
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert any("malformed annotation tensorwasm.io/roll" in m and "not JSON" in m for m in errors), errors

    with_fake_kube(body)
