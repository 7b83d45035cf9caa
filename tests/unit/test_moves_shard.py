"""The move protocol on a source shard: the barrier, the capture only at the barrier, the grace after.

A real Shard, engine, CPU backend, snapshot agent and HTTP app, with the real KubeSource against
tests/fake_kube.py (the test plays the operator by writing what it writes). Every wait is on
state a client or the API would show, never on time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tensorwasm.api.group import API_VERSION
from tensorwasm.runtime.shard import Shard
from tests.fake_kube import FakeKube, until
from tests.unit.test_kube_source_inprocess import (
    NS,
    SHARD,
    TENANTS,
    running_source,
    runtime_of,
    scenario,
    tenant,
)

SNAPSHOTS = f"/apis/{API_VERSION}/namespaces/{NS}/snapshots"
TARGET = "tensorwasm-shard-1"
AUTH = {"Authorization": "Bearer s3cret-token-1"}


@asynccontextmanager
async def serving_alpha(fake: FakeKube, store: Path) -> AsyncIterator[tuple[Shard, str]]:
    """Tenant alpha placed here, served over HTTP and reported loaded: (the shard, alpha's echo URL)."""
    await fake.put(TENANTS, tenant("alpha"))
    async with running_source(fake, store, serve_http=True) as (shard, _, base):
        await fake.wait_for(lambda: runtime_of(fake, "alpha").get("loaded"))
        yield shard, f"{base}/v1/functions/echo/invoke"


async def call(url: str) -> tuple[int, dict[str, Any], str | None]:
    async with aiohttp.ClientSession() as session, session.post(url, data=b"hi", headers=AUTH) as r:
        body = await r.json() if r.status != 200 else {}
        return r.status, body.get("error", {}), r.headers.get("Retry-After")


def move_snapshot(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"tensorwasm.io/purpose": "move"}},
        "spec": {"tenant": "alpha"},
    }


def snapshot_phase(fake: FakeKube, name: str) -> str:
    return str(((fake.get(SNAPSHOTS, name) or {}).get("status") or {}).get("phase") or "")


def test_the_source_holds_a_moving_tenant_captures_at_the_barrier_and_answers_moving_after_it_left(
    tmp_path: Path,
) -> None:
    async def body(fake: FakeKube) -> None:
        async with serving_alpha(fake, tmp_path) as (shard, url):
            assert (await call(url))[0] == 200
            # The move Snapshot may reach the shard before status.move: it waits for the barrier.
            await fake.put(SNAPSHOTS, move_snapshot("alpha-move-1"))
            await fake.put(SNAPSHOTS, {"metadata": {"name": "alpha-manual"}, "spec": {"tenant": "alpha"}})
            await fake.wait_for(lambda: snapshot_phase(fake, "alpha-manual") == "Ready")
            assert snapshot_phase(fake, "alpha-move-1") == "" and (await call(url))[0] == 200

            move = {"source": SHARD, "target": TARGET, "phase": "Holding", "snapshot": "alpha-move-1"}
            await fake.put_status(TENANTS, "alpha", {"move": move})
            await fake.wait_for(lambda: snapshot_phase(fake, "alpha-move-1") == "Ready")
            status, error, retry_after = await call(url)
            assert (status, error.get("kind"), retry_after) == (503, "tenant_moving", "1")
            assert error["tenant"] == "alpha"

            # The operator re-points the tenant: the shard unloads it and keeps answering "moving"
            # (clients the Service still routes here retry, and reach the target).
            await fake.put_status(TENANTS, "alpha", {"shard": TARGET, "move": {**move, "phase": "Restoring"}})
            await until(lambda: "alpha" not in shard.served)
            status, error, retry_after = await call(url)
            assert (status, error.get("kind"), retry_after) == (503, "tenant_moving", "1")

            # Rolled back: the tenant is ours again and serves (not "moving") once loaded.
            await fake.put_status(TENANTS, "alpha", {"shard": SHARD, "move": None})
            await until(lambda: "alpha" in shard.served and not shard.holds)
            assert (await call(url))[0] == 200

    scenario(body)


def test_a_move_rolled_back_while_holding_serves_again_and_a_deleted_tenant_is_not_held(
    tmp_path: Path,
) -> None:
    async def body(fake: FakeKube) -> None:
        async with serving_alpha(fake, tmp_path) as (shard, url):
            move = {"source": SHARD, "target": TARGET, "phase": "Holding", "snapshot": "alpha-move-2"}
            await fake.put_status(TENANTS, "alpha", {"move": move})
            await until(lambda: "alpha" in shard.holds)
            status, error, retry_after = await call(url)
            assert (status, error.get("kind"), retry_after) == (503, "tenant_moving", "1")
            await fake.put_status(TENANTS, "alpha", {"move": None})  # the operator gave up
            await until(lambda: not shard.holds)
            assert (await call(url))[0] == 200
            # Deleting a tenant revokes its token at once: 401, never "moving". (Its finalizer makes
            # the API server mark it first, as here, and remove it once the operator lets go.)
            await fake.put(
                TENANTS, {"metadata": {"name": "alpha", "finalizers": ["tensorwasm.io/finalizer"]}}
            )
            await fake.remove(TENANTS, "alpha")
            await until(lambda: "alpha" not in shard.served)
            await fake.put(TENANTS, {"metadata": {"name": "alpha", "finalizers": []}})
            await fake.wait_for(lambda: fake.get(TENANTS, "alpha") is None)
            await until(lambda: "alpha" not in shard.served)
            assert (await call(url))[0] == 401 and not shard.holds

    scenario(body)
