"""The move protocol on a source shard: the barrier, the capture only at the barrier, the grace after.

A real Shard, engine, CPU backend, snapshot agent and HTTP app, with the real KubeSource against
tests/fake_kube.py (the test plays the operator by writing what it writes). Every wait is on
state a client or the API would show, never on time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tensorwasm.api.group import API_VERSION
from tensorwasm.api.tenant import parse_tenant
from tensorwasm.operator.moves import target_reported
from tensorwasm.runtime.settings import RuntimeSettings
from tensorwasm.runtime.shard import Shard
from tensorwasm.runtime.snapshots import signing
from tensorwasm.runtime.snapshots.signing import KeyRing, SigningPolicy
from tensorwasm.runtime.sources import kube as source_module
from tests.fake_kube import FakeKube, running_shard, until
from tests.unit.test_kube_source_inprocess import (
    NS,
    SECRETS,
    SHARD,
    TENANTS,
    b64,
    running_source,
    runtime_of,
    scenario,
    tenant,
)

SNAPSHOTS = f"/apis/{API_VERSION}/namespaces/{NS}/snapshots"
TARGET = "tensorwasm-shard-1"


@asynccontextmanager
async def serving_alpha(fake: FakeKube, store: Path) -> AsyncIterator[tuple[Shard, str]]:
    """Tenant alpha placed here, served over HTTP and reported loaded: (the shard, alpha's echo URL)."""
    await fake.put(TENANTS, tenant("alpha"))
    async with running_source(fake, store, serve_http=True) as (shard, _, base):
        await fake.wait_for(lambda: runtime_of(fake, "alpha").get("loaded"))
        yield shard, f"{base}/v1/functions/echo/invoke"


async def call(url: str, token: str = "s3cret-token-1") -> tuple[int, dict[str, Any], str | None]:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session, session.post(url, data=b"hi", headers=headers) as r:
        body = await r.json() if r.status != 200 else {}
        return r.status, body.get("error", {}), r.headers.get("Retry-After")


# alpha's Secret with a rotation token and a read token beside the primary one.
TOKENS = {"token": "s3cret-token-1", "token.next": "next-token-22", "read-token": "reader-token-3"}


async def with_every_token(fake: FakeKube) -> None:
    data = {key: b64(value.encode()) for key, value in TOKENS.items()}
    await fake.put(SECRETS, {"metadata": {"name": "tw-alpha-token"}, "data": data})


async def kinds(url: str) -> dict[str, tuple[int, str]]:
    """(status, error kind) per token key of alpha's Secret."""
    out = {}
    for key, token in TOKENS.items():
        status, error, _ = await call(url, token)
        out[key] = (status, str(error.get("kind", "")))
    return out


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


def test_every_token_of_a_moving_tenant_is_told_to_retry_never_401(tmp_path: Path) -> None:
    """Rotation (token.next) and read tokens get what the primary gets: 503 tenant_moving while held
    and after the tenant left (a 401 is not retried and counts as a failed authentication)."""

    async def body(fake: FakeKube) -> None:
        await with_every_token(fake)
        async with serving_alpha(fake, tmp_path) as (shard, url):
            await until(lambda: len(shard.served["alpha"].config.all_tokens()) == len(TOKENS))
            assert (await kinds(url))["token.next"] == (200, "")
            move = {"source": SHARD, "target": TARGET, "phase": "Holding", "snapshot": "alpha-move-4"}
            await fake.put_status(TENANTS, "alpha", {"move": move})
            await until(lambda: "alpha" in shard.holds)
            moving = dict.fromkeys(TOKENS, (503, "tenant_moving"))
            assert await kinds(url) == moving
            await fake.put_status(TENANTS, "alpha", {"shard": TARGET, "move": {**move, "phase": "Restoring"}})
            await until(lambda: "alpha" not in shard.served)
            assert await kinds(url) == moving

    scenario(body)


def test_the_source_answers_moving_until_the_move_is_over_then_lets_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a fixed grace after the tenant left: its Service selects this shard until the target
    reports it loaded, however long the restore takes (issue F17)."""
    monkeypatch.setattr(source_module, "_LEFT_CHECK_S", 0.01)
    monkeypatch.setattr(source_module, "MOVED_LINGER_S", 0.0)  # no kube-proxy lag to cover here
    monkeypatch.setattr(source_module, "HANDOFF_LINGER_S", 0.0)

    async def body(fake: FakeKube) -> None:
        async with running_source(fake, tmp_path, serve_http=True) as (shard, source, base):
            await fake.put(TENANTS, tenant("alpha"))
            await fake.wait_for(lambda: runtime_of(fake, "alpha").get("loaded"))
            url = f"{base}/v1/functions/echo/invoke"
            # SIGTERM on a shard being scaled in (no StatefulSet here says otherwise): it hands off.
            handoff = asyncio.create_task(source.hand_off())
            await asyncio.sleep(0)  # (a yield, not a wait: it sees alpha ours before the move)
            move = {"source": SHARD, "target": TARGET, "phase": "Restoring"}
            await fake.put_status(TENANTS, "alpha", {"shard": TARGET, "move": move})
            await until(lambda: "alpha" not in shard.served)
            # The source has read the moved Tenant by name (twice more) and found its move going on.
            reads = source.left_reads
            await until(lambda: source.left_reads >= reads + 2)
            assert (await call(url))[1].get("kind") == "tenant_moving" and "alpha" in shard.holds
            assert not handoff.done()  # the Service may still send its clients here
            await fake.put_status(TENANTS, "alpha", {"move": None})  # the target reported it loaded
            await until(lambda: "alpha" not in shard.holds)
            assert (await call(url))[0] == 401
            assert await handoff == 1

    scenario(body)


def test_a_move_target_that_cannot_restore_the_move_snapshot_never_reports_the_tenant_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving fresh (or older) state on the target would lose every write since the capture: the
    target reports MoveRestoreFailed, not loaded, so the operator's timeout rolls back (issue F18);
    once it can restore the move's Snapshot (its key arrived) the move finishes."""
    old, new = KeyRing({"k1": b"1" * 32}, "k1"), KeyRing({"k2": b"2" * 32}, "k2")
    monkeypatch.setattr(signing, "POLICY", SigningPolicy("require", ring=old))
    target_settings = RuntimeSettings(namespace=NS, shard_name=TARGET, snapshot_dir=tmp_path)

    async def body(fake: FakeKube) -> None:
        await with_every_token(fake)
        async with (
            serving_alpha(fake, tmp_path) as (_, url),
            running_shard(fake, target_settings, serve_http=True) as (target, _, target_url),
        ):
            move = {"source": SHARD, "target": TARGET, "phase": "Holding", "snapshot": "alpha-move-5"}
            await fake.put(SNAPSHOTS, move_snapshot("alpha-move-5"))
            await fake.put_status(TENANTS, "alpha", {"move": move})
            await fake.wait_for(lambda: snapshot_phase(fake, "alpha-move-5") == "Ready")
            # Rotation done out of order: the target's ring lacks the key the source signed with.
            monkeypatch.setattr(signing, "POLICY", SigningPolicy("require", ring=new))
            await fake.put_status(TENANTS, "alpha", {"shard": TARGET, "move": {**move, "phase": "Restoring"}})
            await fake.wait_for(lambda: runtime_of(fake, "alpha").get("reason") == "MoveRestoreFailed")
            runtime = runtime_of(fake, "alpha")
            assert (runtime["shard"], runtime["loaded"]) == (TARGET, False)
            assert "alpha-move-5 not restored" in runtime["message"] and "'k1'" in runtime["message"]
            assert not target_reported(parse_tenant(fake.get(TENANTS, "alpha") or {}), TARGET)
            assert "alpha" not in target.served
            # Clients the Service already routes to the target retry; none gets 401.
            invoke = f"{target_url}/v1/functions/echo/invoke"
            assert await kinds(invoke) == dict.fromkeys(TOKENS, (503, "tenant_not_ready"))
            # The key reaches the target: its next pass restores exactly the move's Snapshot.
            monkeypatch.setattr(
                signing, "POLICY", SigningPolicy("require", ring=KeyRing({**old.keys, **new.keys}, "k2"))
            )
            await fake.put(TENANTS, {"metadata": {"name": "alpha", "labels": {"touched": "yes"}}})
            await fake.wait_for(lambda: runtime_of(fake, "alpha").get("loaded") is True)
            assert "restored from Snapshot alpha-move-5" in runtime_of(fake, "alpha")["message"]
            assert target_reported(parse_tenant(fake.get(TENANTS, "alpha") or {}), TARGET)
            assert (await call(invoke))[0] == 200 and (await call(url))[1].get("kind") == "tenant_moving"

    scenario(body)


def test_a_move_target_never_substitutes_an_older_snapshot_for_the_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source_module, "_MOVE_RESTORE_WAIT_S", 0.2)
    target_settings = RuntimeSettings(namespace=NS, shard_name=TARGET, snapshot_dir=tmp_path)

    async def body(fake: FakeKube) -> None:
        async with serving_alpha(fake, tmp_path) as _:
            await fake.put(SNAPSHOTS, {"metadata": {"name": "alpha-older"}, "spec": {"tenant": "alpha"}})
            await fake.wait_for(lambda: snapshot_phase(fake, "alpha-older") == "Ready")
        # The move's Snapshot never became Ready (a lost capture): the older one must not stand in.
        move = {"source": SHARD, "target": TARGET, "phase": "Restoring", "snapshot": "alpha-move-6"}
        await fake.put_status(TENANTS, "alpha", {"shard": TARGET, "move": move})
        async with running_shard(fake, target_settings) as (target, _, _):
            await fake.wait_for(lambda: runtime_of(fake, "alpha").get("reason") == "MoveRestoreFailed")
            assert "alpha-move-6 is not in this shard's cache" in runtime_of(fake, "alpha")["message"]
            assert "alpha" not in target.served

    scenario(body)


def test_a_tenant_that_cannot_wake_defers_only_its_own_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A capture wakes a sleeper first; one that cannot wake (no GPU room) must not stop the pass:
    the other tenants' Snapshots are captured, its own is tried again later (issue F19)."""
    from tensorwasm.runtime.errors import Overloaded

    monkeypatch.setattr(source_module, "_WAKE_RETRY_S", 0.05)

    async def body(fake: FakeKube) -> None:
        await fake.put(
            SECRETS, {"metadata": {"name": "tw-beta-token"}, "data": {"token": b64(b"tok-beta-123")}}
        )
        await fake.put(TENANTS, tenant("beta"))
        async with serving_alpha(fake, tmp_path) as (shard, _):
            await fake.wait_for(lambda: runtime_of(fake, "beta").get("loaded"))
            woken, wake, room = [], shard.wake, {"alpha": False}

            async def no_room_for_alpha(name: str) -> None:
                woken.append(name)
                if not room.get(name, True):
                    raise Overloaded("no GPU room to wake tenant alpha", retry_after_s=1.0)
                await wake(name)

            shard.wake = no_room_for_alpha  # type: ignore[method-assign]
            for name in ("alpha-periodic", "beta-periodic"):  # alpha's first: it is met first
                await fake.put(
                    SNAPSHOTS, {"metadata": {"name": name}, "spec": {"tenant": name.split("-")[0]}}
                )
            await fake.wait_for(lambda: snapshot_phase(fake, "beta-periodic") == "Ready")
            await until(lambda: woken.count("alpha") >= 2)  # tried again, still without room
            assert snapshot_phase(fake, "alpha-periodic") == ""
            room["alpha"] = True  # room again: the retry captures it
            await fake.wait_for(lambda: snapshot_phase(fake, "alpha-periodic") == "Ready")

    scenario(body)
