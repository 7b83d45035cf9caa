"""The shard's Kubernetes source in-process: real Shard, engine and CPU backend, real HTTP to a fake API.

tests/fake_kube.py stands in for the API server (the one component the project does not own);
KubeSource, its informers and tensorwasm.kube.client are the real ones. Every wait is on state a
user could observe (the Tenant's status, the shard's served set), never on time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from tensorwasm.api.group import API_VERSION
from tensorwasm.runtime.settings import RuntimeSettings
from tests.fake_kube import FakeKube, RunningShard, running_shard, until, with_fake_kube

NS, SHARD = "team-a", "tensorwasm-shard-0"
TENANTS = f"/apis/{API_VERSION}/namespaces/{NS}/tenants"
SECRETS, CONFIGMAPS = f"/api/v1/namespaces/{NS}/secrets", f"/api/v1/namespaces/{NS}/configmaps"
MODULE = (Path(__file__).resolve().parents[2] / "examples/modules/echo.wasm").read_bytes()
SHA = hashlib.sha256(MODULE).hexdigest()


def tenant(name: str, shard: str = SHARD, **spec: Any) -> dict[str, Any]:
    body = {"module": {"configMapRef": {"name": "modules", "key": "echo.wasm"}, "sha256": SHA},
            "functions": ["echo"], **spec}  # fmt: skip
    return {"apiVersion": API_VERSION, "kind": "Tenant", "metadata": {"name": name}, "spec": body,
            "status": {"shard": shard, "phase": "Placed"}}  # fmt: skip


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def running_source(
    fake: FakeKube, snapshot_dir: Path | None = None, missing_grace_s: float = 2.0, **options: Any
) -> AbstractAsyncContextManager[RunningShard]:
    """Shard SHARD of namespace NS against `fake` (tests.fake_kube.running_shard)."""
    settings = RuntimeSettings(
        namespace=NS, shard_name=SHARD, snapshot_dir=snapshot_dir, missing_grace_s=missing_grace_s
    )
    return running_shard(fake, settings, **options)


def scenario(body: Callable[[FakeKube], Awaitable[None]]) -> None:
    """`body` against a fake API holding the module ConfigMap and alpha's token Secret."""

    async def seeded(fake: FakeKube) -> None:
        await fake.put(
            SECRETS, {"metadata": {"name": "tw-alpha-token"}, "data": {"token": b64(b"s3cret-token-1")}}
        )
        await fake.put(
            CONFIGMAPS, {"metadata": {"name": "modules"}, "binaryData": {"echo.wasm": b64(MODULE)}}
        )
        await body(fake)

    with_fake_kube(seeded)


def runtime_of(fake: FakeKube, name: str) -> dict[str, Any]:
    return dict(((fake.get(TENANTS, name) or {}).get("status") or {}).get("runtime") or {})


def test_a_placed_tenant_is_served_and_ready_in_one_status_write() -> None:
    async def body(fake: FakeKube) -> None:
        await fake.put(TENANTS, tenant("alpha"))
        async with running_source(fake) as (shard, _, _):
            await fake.wait_for(lambda: runtime_of(fake, "alpha").get("loaded"))
            status = fake.get(TENANTS, "alpha")["status"]  # type: ignore[index]
            # The shard wrote the readiness its report implies, with the operator's maths.
            assert status["phase"] == "Ready" and status["runtime"]["shard"] == SHARD
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            assert (ready["status"], ready["reason"]) == ("True", "Serving")
            assert fake.writes.count(("PATCH", f"{TENANTS}/alpha/status")) == 1
            assert "alpha" in shard.served

    scenario(body)


def test_a_tenant_moved_away_is_unloaded_and_an_invalid_one_is_refused() -> None:
    async def body(fake: FakeKube) -> None:
        await fake.put(TENANTS, tenant("alpha"))
        await fake.put(
            SECRETS, {"metadata": {"name": "tw-gamma-token"}, "data": {"token": b64(b"tok-gamma-12")}}
        )
        await fake.put(TENANTS, tenant("gamma", limits={"gpuMemory": 0}))
        await fake.put(TENANTS, tenant("other", shard="tensorwasm-shard-1"))
        async with running_source(fake) as (shard, _, _):
            await fake.wait_for(lambda: runtime_of(fake, "alpha").get("loaded"))
            refused = await fake.wait_for(lambda: runtime_of(fake, "gamma").get("reason"))
            assert (
                refused == "InvalidSpec" and "spec.limits.gpuMemory" in runtime_of(fake, "gamma")["message"]
            )
            assert runtime_of(fake, "other") == {}  # not ours: never touched
            # The operator moves alpha to another shard: this one stops serving it.
            await fake.put_status(TENANTS, "alpha", {"shard": "tensorwasm-shard-1"})
            await until(lambda: "alpha" not in shard.served)

    scenario(body)


def test_a_missing_secret_is_reported_once_it_stays_missing() -> None:
    async def body(fake: FakeKube) -> None:
        await fake.put(TENANTS, tenant("beta"))
        # --missing-grace 0: the report is due at once
        async with running_source(fake, missing_grace_s=0.0) as (shard, _, _):
            assert await fake.wait_for(lambda: runtime_of(fake, "beta").get("reason")) == "SecretMissing"
            await fake.put(
                SECRETS, {"metadata": {"name": "tw-beta-token"}, "data": {"token": b64(b"tok-beta-123")}}
            )
            await fake.wait_for(lambda: runtime_of(fake, "beta").get("loaded"))
            assert "beta" in shard.served

    scenario(body)


def test_the_watch_survives_an_api_error_and_a_dropped_stream() -> None:
    async def body(fake: FakeKube) -> None:
        fake.fail("GET", CONFIGMAPS, 500)  # the first list fails: the informer lists again
        await fake.put(TENANTS, tenant("alpha"))
        async with running_source(fake) as (_, source, _):
            await fake.wait_for(lambda: runtime_of(fake, "alpha").get("loaded"))
            assert source.informers["configmaps"].lists >= 1
            fake.fail(
                "PATCH", f"{TENANTS}/delta/status", 500
            )  # one report write fails: the next pass retries
            await fake.put(
                CONFIGMAPS, {"metadata": {"name": "modules"}, "binaryData": {"echo.wasm": b64(MODULE)}}
            )
            await fake.put(
                SECRETS, {"metadata": {"name": "tw-delta-token"}, "data": {"token": b64(b"tok-delta-12")}}
            )
            await fake.put(TENANTS, tenant("delta"))
            await fake.wait_for(lambda: runtime_of(fake, "delta").get("loaded"))

    scenario(body)


def test_a_source_cancelled_as_a_change_arrives_stops() -> None:
    """The shard's SIGTERM (its source task cancelled) in the same loop turn as a watch event: the
    source must stop. On Python 3.11 asyncio.wait_for returned the event there and swallowed the
    cancellation, and the loop ran on for ever (a test teardown that awaited it hung)."""

    async def body(fake: FakeKube) -> None:
        await fake.put(TENANTS, tenant("alpha"))
        async with running_source(fake) as (_, source, _):
            task = next(t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "KubeSource.run")
            await fake.wait_for(lambda: runtime_of(fake, "alpha").get("loaded"))
            await until(lambda: source._dirty._waiters)  # idle between passes, waiting for a change
            source._dirty.set()  # what a watch event does (on_change -> _mark_dirty)
            task.cancel()  # and SIGTERM, in the same loop turn
            await asyncio.wait([task], timeout=30)
            assert task.cancelled(), "the source ran on after its cancellation"

    scenario(body)
