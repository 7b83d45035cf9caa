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

from tensorwasm.operator.roll import ROLL_ANNOTATION
from tests.fake_kube import FakeKube, with_fake_kube
from tests.unit.test_moves import NAMES, PODS, S0, Clock, move, operator, selected
from tests.unit.test_reconciler_inprocess import SNAPSHOTS, STATEFULSETS, TENANTS, status, tenant

READY = {"conditions": [{"type": "Ready", "status": "True"}]}


async def pod(fake: FakeKube, name: str, revision: str) -> None:
    await fake.put(PODS, {"metadata": {"name": name, "labels": {"controller-revision-hash": revision}}})
    await fake.put_status(PODS, name, READY)


class Cluster:
    """The StatefulSet controller and the shards, as far as the operator can see them."""

    def __init__(self, fake: FakeKube) -> None:
        self.fake = fake
        self.gaps: list[str] = []
        self.deleted: list[str] = []

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
            serving = {selected(fake, n) for n in NAMES}
            for name in pods:  # a scaled-in pod terminates once it has handed its tenants off
                if int(name.rsplit("-", 1)[1]) >= replicas and name not in serving:
                    self.deleted.append(name)
                    await fake.remove(PODS, name)
            for name in NAMES:
                record = move(fake, name)
                if record.get("phase") == "Holding" and fake.get(SNAPSHOTS, record["snapshot"]):
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
