"""The operator's Reconciler in-process: placement, capacity, finalizers, moves and backoff.

The real Reconciler, Ledger, builders and tensorwasm.kube client talk HTTP to tests/fake_kube.py
(the API server is the one stand-in). `Watcher` plays kopf's part: it hands every watch event to
the reconciler method kopf's handlers call. Waits are on the fake's state, never on time.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from tensorwasm.api.group import API_VERSION, FINALIZER, LABEL_TENANT
from tensorwasm.operator.moves import DirectMove, MoveStep
from tensorwasm.operator.placement import ranked
from tensorwasm.operator.reconciler import Reconciler
from tensorwasm.operator.settings import OperatorSettings
from tensorwasm.planner.admission import ShardCapacity
from tests.fake_kube import FakeKube, with_fake_kube

NS = "team-a"
TENANTS = f"/apis/{API_VERSION}/namespaces/{NS}/tenants"
SNAPSHOTS = f"/apis/{API_VERSION}/namespaces/{NS}/snapshots"
STATEFULSETS = f"/apis/apps/v1/namespaces/{NS}/statefulsets"
SERVICES, SECRETS = f"/api/v1/namespaces/{NS}/services", f"/api/v1/namespaces/{NS}/secrets"
SETTINGS = OperatorSettings(namespace=NS, shards=2, reconcile_retry_s=0.02)


def tenant(name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "module": {"url": f"https://m.example/{name}.wasm", "sha256": "a" * 64},
        "functions": ["f"],
        **spec,
    }
    return {"apiVersion": API_VERSION, "kind": "Tenant", "metadata": {"name": name}, "spec": body}


class Watcher:
    """kopf's part: every event of the watched kinds goes to the reconciler, in order."""

    def __init__(self, fake: FakeKube, reconciler: Reconciler) -> None:
        self.fake, self.reconciler, self.seen = fake, reconciler, fake.version

    async def run(self) -> None:
        while True:
            async with self.fake.changed:
                await self.fake.changed.wait_for(lambda: self.fake.version > self.seen)
            for event in [e for e in self.fake.events if e.version > self.seen]:
                self.seen = event.version
                await self.deliver(event.collection, event.type, event.obj)

    async def deliver(self, collection: str, type_: str, obj: dict[str, Any]) -> None:
        r = self.reconciler
        if collection == TENANTS:
            await r.on_tenant(type_, obj)
        elif collection == SNAPSHOTS:
            await r.on_snapshot(type_, obj)
        elif collection == STATEFULSETS:
            await r.on_statefulset(type_, obj)
        elif collection in (SERVICES, SECRETS) and LABEL_TENANT in (obj["metadata"].get("labels") or {}):
            r.observe_owned("Service" if collection == SERVICES else "Secret", type_, obj)


@asynccontextmanager
async def operator(
    fake: FakeKube, settings: OperatorSettings = SETTINGS, clock: Callable[[], str] | None = None
) -> AsyncIterator[Reconciler]:
    """The real Reconciler against `fake`, fed by a Watcher; `clock` defaults to one that ticks on
    every reading (a test that needs timeouts to pass moves its own)."""
    if clock is None:
        ticks = itertools.count()
        clock = lambda: f"2026-11-29T12:{next(ticks) // 60 % 60:02d}:{next(ticks) % 60:02d}Z"  # noqa: E731
    api = fake.client("tensorwasm-operator")
    reconciler = Reconciler(settings, api, clock=clock)
    await reconciler.start()
    watcher = asyncio.create_task(Watcher(fake, reconciler).run())
    try:
        yield reconciler
    finally:
        watcher.cancel()
        await reconciler.drain()
        await api.close()


def status(fake: FakeKube, name: str) -> dict[str, Any]:
    return dict((fake.get(TENANTS, name) or {}).get("status") or {})


def condition(fake: FakeKube, name: str, type_: str) -> dict[str, Any]:
    return next((c for c in status(fake, name).get("conditions") or [] if c["type"] == type_), {})


def test_tenants_are_placed_with_finalizer_secret_service_and_status_then_nothing_is_rewritten() -> None:
    async def body(fake: FakeKube) -> None:
        async with operator(fake) as reconciler:
            assert fake.get(STATEFULSETS, "tensorwasm-shard")["spec"]["replicas"] == 2  # type: ignore[index]
            for name in ("a", "b", "c", "d"):
                await fake.put(TENANTS, tenant(name))
            await fake.wait_for(lambda: all(status(fake, n).get("phase") == "Placed" for n in "abcd"))
            # Each Tenant's phase change posts one Event, after its status write.
            await fake.wait_for(lambda: len(fake.items(f"/api/v1/namespaces/{NS}/events")) == 4)
            await reconciler.drain()
            for name in "abcd":
                shard = status(fake, name)["shard"]
                assert shard in ("tensorwasm-shard-0", "tensorwasm-shard-1")
                assert FINALIZER in fake.get(TENANTS, name)["metadata"]["finalizers"]  # type: ignore[index]
                service = fake.get(SERVICES, f"tw-{name}")
                assert service is not None and service["spec"]["selector"] == {
                    "statefulset.kubernetes.io/pod-name": shard
                }
                assert fake.get(SECRETS, f"tw-{name}-token") is not None
                assert condition(fake, name, "Placed")["status"] == "True"
            # Level-triggered and quiet: every Tenant delivered again (a re-list) writes nothing.
            before = len(fake.writes)
            for name in "abcd":
                await reconciler.on_tenant("MODIFIED", fake.get(TENANTS, name))  # type: ignore[arg-type]
            await reconciler.drain()
            assert fake.writes[before:] == []

    with_fake_kube(body)


def test_a_tenant_that_fits_nowhere_waits_pending_and_is_placed_when_room_frees() -> None:
    small = replace(SETTINGS, shard_capacity=ShardCapacity(16 << 30, 100, 32 << 30, max_tenants=1))

    async def body(fake: FakeKube) -> None:
        async with operator(fake, small):
            for name in ("a", "b", "c"):
                await fake.put(TENANTS, tenant(name))
            await fake.wait_for(lambda: status(fake, "c").get("phase") in ("Pending", "Placed"))
            pending = [n for n in "abc" if status(fake, n).get("phase") == "Pending"]
            assert len(pending) == 1
            waiting = pending[0]
            assert condition(fake, waiting, "Placed")["reason"] == "InsufficientCapacity"
            assert "insufficient tenants" in condition(fake, waiting, "Placed")["message"]
            # Deleting a placed tenant (finalizer released by the operator) frees its room.
            victim = next(n for n in "abc" if n != waiting)
            await fake.remove(TENANTS, victim)
            await fake.wait_for(lambda: fake.get(TENANTS, victim) is None)
            await fake.wait_for(lambda: status(fake, waiting).get("phase") == "Placed")

    with_fake_kube(body)


def test_an_invalid_spec_fails_without_placement() -> None:
    async def body(fake: FakeKube) -> None:
        async with operator(fake):
            await fake.put(TENANTS, tenant("bad", limits={"timeoutMs": 700_000}))
            await fake.wait_for(lambda: status(fake, "bad").get("phase") == "Failed")
            ready = condition(fake, "bad", "Ready")
            assert ready["reason"] == "InvalidSpec" and "spec.limits.timeoutMs" in ready["message"]
            assert status(fake, "bad").get("shard") is None and fake.get(SERVICES, "tw-bad") is None

    with_fake_kube(body)


def test_a_placed_tenant_whose_spec_becomes_invalid_keeps_its_shard_until_the_spec_is_fixed() -> None:
    async def body(fake: FakeKube) -> None:
        async with operator(fake) as reconciler:
            await fake.put(TENANTS, tenant("a"))
            await fake.wait_for(lambda: status(fake, "a").get("phase") == "Placed")
            shard = status(fake, "a")["shard"]
            held = reconciler.ledger.shard_of("a")
            # Its shard refuses the spec too and keeps the tenant's state asleep: unplacing it would
            # look like a move there, and the state would be gone.
            await fake.put(TENANTS, tenant("a", limits={"timeoutMs": 700_000}))
            await fake.wait_for(lambda: status(fake, "a").get("phase") == "Failed")
            assert condition(fake, "a", "Ready")["reason"] == "InvalidSpec"
            assert status(fake, "a")["shard"] == shard and reconciler.ledger.shard_of("a") == held
            assert fake.get(SERVICES, "tw-a") is not None
            await fake.put(TENANTS, tenant("a", limits={"timeoutMs": 1000}))  # fixed: the same shard
            await fake.wait_for(lambda: status(fake, "a").get("phase") == "Placed")
            assert status(fake, "a")["shard"] == shard

    with_fake_kube(body)


def test_api_errors_are_retried_with_backoff_until_the_status_lands() -> None:
    async def body(fake: FakeKube) -> None:
        fake.fail("PATCH", f"{TENANTS}/a/status", 500, 500, 503)
        async with operator(fake):
            await fake.put(TENANTS, tenant("a"))
            await fake.wait_for(lambda: status(fake, "a").get("phase") == "Placed")
            assert fake.failures[("PATCH", f"{TENANTS}/a/status")] == []  # all three were met, then retried

    with_fake_kube(body)


def test_scaling_in_moves_tenants_at_once_and_scaling_out_moves_them_through_a_snapshot() -> None:
    async def body(fake: FakeKube) -> None:
        async with operator(fake) as reconciler:
            names = [f"t{i}" for i in range(6)]
            for name in names:
                await fake.put(TENANTS, tenant(name))
            await fake.wait_for(lambda: all(status(fake, n).get("phase") == "Placed" for n in names))
            first = {n: status(fake, n)["shard"] for n in names}
            assert "tensorwasm-shard-1" in first.values(), first  # six tenants spread over two shards

            # 2 -> 1: shard-1 is gone, so its tenants move at once (nothing to capture from).
            sts = fake.get(STATEFULSETS, "tensorwasm-shard")
            assert sts is not None
            await fake.put(STATEFULSETS, {**sts, "spec": {**sts["spec"], "replicas": 1}})
            await fake.wait_for(lambda: all(status(fake, n)["shard"] == "tensorwasm-shard-0" for n in names))
            assert fake.items(SNAPSHOTS) == []

            # 1 -> 2: shard-0 still runs, so each tenant the new shard takes (up to a fair share) is
            # captured there first (policy OnMove) and re-pointed once its Snapshot is Ready. The
            # moves start once the new shard's pod is Ready (tests/unit/test_moves_ready.py).
            ready = {"conditions": [{"type": "Ready", "status": "True"}]}
            await fake.put(f"/api/v1/namespaces/{NS}/pods", {"metadata": {"name": "tensorwasm-shard-1"},
                                                           "status": ready})  # fmt: skip
            await fake.put(STATEFULSETS, {**sts, "spec": {**sts["spec"], "replicas": 2}})
            await fake.wait_for(lambda: fake.items(SNAPSHOTS))
            await reconciler.drain()
            movers = [snap["spec"]["tenant"] for snap in fake.items(SNAPSHOTS)]
            assert 1 <= len(movers) <= len(names) // 2
            # Rendezvous hashing: only tenants that now rank the new shard first may move.
            assert set(movers) <= {n for n in names if ranked(n, 2)[0] == 1}
            for snap in fake.items(SNAPSHOTS):
                mover = snap["spec"]["tenant"]
                assert snap["metadata"]["labels"]["tensorwasm.io/purpose"] == "move"
                assert status(fake, mover)["move"]["target"] == "tensorwasm-shard-1"
                assert status(fake, mover)["shard"] == "tensorwasm-shard-0"  # not before its Snapshot
                # The source shard captures it (what snapshots/kube.py writes), and the move goes.
                await fake.put_status(SNAPSHOTS, snap["metadata"]["name"], {"phase": "Ready"})
            await fake.wait_for(lambda: all(status(fake, n)["shard"] == "tensorwasm-shard-1" for n in movers))
            await fake.wait_for(lambda: all(status(fake, n).get("move") is None for n in movers))
            stayed = [n for n in names if n not in movers]
            assert all(status(fake, n)["shard"] == "tensorwasm-shard-0" for n in stayed)

    with_fake_kube(body)


def test_a_move_rolled_back_to_a_shard_name_outside_the_set_does_not_put_the_tenant_on_shard_0() -> None:
    class BackToNowhere(DirectMove):
        """A strategy whose rollback names a pod that is no shard of the set (a hand-edited status)."""

        async def step(self, tenant: Any, target: str, runs: Any) -> MoveStep:
            return MoveStep("someone-elses-pod", "someone-elses-pod")

    name = next(n for n in (f"t{i}" for i in range(50)) if ranked(n, 2)[0] == 1)

    async def body(fake: FakeKube) -> None:
        api = fake.client("tensorwasm-operator")
        reconciler = Reconciler(SETTINGS, api, mover=BackToNowhere())
        await reconciler.start()
        await fake.put(TENANTS, tenant(name))
        await reconciler.on_tenant("ADDED", fake.get(TENANTS, name))  # type: ignore[arg-type]
        await reconciler.drain()
        assert reconciler.ledger.shard_of(name) == 1  # the ledger's own choice stands
        await api.close()

    with_fake_kube(body)
