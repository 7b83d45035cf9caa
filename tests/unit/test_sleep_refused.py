"""A tenant refused for a spec or Secret problem loses nothing; one bad extra token key refuses nobody.

Review R2 G7: a weak `read-token.<id>` added to a serving tenant's Secret refused the whole tenant,
and a refused tenant was unloaded destructively (its sleep snapshot deleted), so fixing the Secret
brought it back fresh. Now a bad *extra* key is ignored (named in the status, never its value) and
the tenant keeps serving with its other keys; and a refused tenant whose Tenant still exists is put
to sleep and unloaded keeping its snapshot: fixing the spec or Secret brings it back in its state.
Only the Tenant's deletion drops that state (the orphan sweep, tests/unit/test_sleep_sweep.py).

A real shard (CPU backend) serving tests/fixtures/counter.wat, whose total lives in a GPU buffer:
a tenant that lost its state answers a smaller number. The Kubernetes source's resolver (pure)
turns the Tenant and its Secret into the shard's config, as a running shard does.
"""

# ruff: noqa: F811  (pytest fixtures are imported by name and taken as parameters)
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tensorwasm.runtime.shard import ASLEEP, LOADED, TenantStatus
from tensorwasm.runtime.snapshots.store import SnapshotStore
from tensorwasm.runtime.sources.kube import ClusterView, resolve_tenants
from tensorwasm.runtime.tenancy.config import TenantConfig
from tests.runtime_fixtures import FIXTURES, RuntimeServer, runtime_server, sha256_of  # noqa: F401
from tests.unit.test_runtime_sleep import CAP, add, counter, reason, wait_for

COUNTER = FIXTURES / "counter.wat"
PRIMARY = b"tok-alpha-primary-1"


def store_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file())


def refuse(server: RuntimeServer, name: str, *serving: TenantConfig) -> None:
    """`name` refused by its source (an invalid spec edit, its Secret gone), `serving` still served."""
    server.sync(list(serving), {name: TenantStatus(False, "InvalidSpec", "spec.limits: made invalid", 1)})


def test_a_refused_sleeper_keeps_its_snapshot_and_comes_back_in_its_state(
    runtime_server: Callable[..., RuntimeServer], tmp_path: Path
) -> None:
    # The review's probe: a sleeping counter at 5 refused, then fixed, answered 1 (its state deleted).
    cfg = counter("alpha", after="200ms")
    server = runtime_server([cfg], sleep_store=SnapshotStore(tmp_path / "store"))
    assert add(server, cfg, 5) == 5
    wait_for(lambda: reason(server, "alpha") == ASLEEP)
    files = store_files(tmp_path / "store")
    refuse(server, "alpha")
    assert "alpha" not in server.shard.served and reason(server, "alpha") == "InvalidSpec"
    assert server.invoke(cfg, "add").status == 401  # refused: its token no longer reaches anything
    assert store_files(tmp_path / "store") == files  # record and blob kept
    server.sync([cfg])  # the spec (or Secret) fixed
    assert reason(server, "alpha") == ASLEEP
    assert add(server, cfg, 1) == 6


def test_a_refused_awake_tenant_is_put_to_sleep_first_so_its_live_state_is_kept(
    runtime_server: Callable[..., RuntimeServer], tmp_path: Path
) -> None:
    cfg, other = counter("alpha", after="1h"), counter("beta", after="1h")
    server = runtime_server([cfg, other], sleep_store=SnapshotStore(tmp_path / "store"))
    assert add(server, cfg, 5) == 5 and add(server, other, 7) == 7
    assert reason(server, "alpha") == LOADED  # awake: its state is only in memory
    refuse(server, "alpha", other)
    assert server.invoke(cfg, "add").status == 401
    assert reason(server, "beta") == LOADED and add(server, other, 1) == 8  # the neighbour is untouched
    server.sync([cfg, other])
    assert add(server, cfg, 1) == 6


def counter_tenant(secret: dict[str, bytes]) -> ClusterView:
    """The counter as a Tenant resource with its ConfigMap and token Secret."""
    obj = {
        "metadata": {"name": "alpha", "namespace": "ns", "uid": "uid-alpha", "generation": 1},
        "spec": {
            "module": {
                "configMapRef": {"name": "alpha-module", "key": "m.wat"},
                "sha256": sha256_of(COUNTER),
            },
            "functions": ["add"],
            "limits": {"gpuMemory": str(CAP)},
            "authSecretRef": {"name": "alpha-token"},
            "idle": {"after": "1h"},
        },
        "status": {"shard": "shard-0"},
    }
    return ClusterView(
        [obj], configmaps={"alpha-module": {"m.wat": COUNTER.read_bytes()}}, secrets={"alpha-token": secret}
    )


def resolved(view: ClusterView) -> TenantConfig:
    configs, failed = resolve_tenants(view)
    assert failed == {}, failed
    (config,) = configs
    return config


def call(server: RuntimeServer, token: bytes, n: int) -> tuple[int, bytes]:
    reply = server.request("POST", "/v1/functions/add/invoke", n.to_bytes(8, "little"), token=token.decode())
    return reply.status, reply.body


def test_a_weak_extra_key_in_the_secret_is_ignored_and_the_tenant_keeps_serving(
    runtime_server: Callable[..., RuntimeServer], tmp_path: Path
) -> None:
    server = runtime_server([], sleep_store=SnapshotStore(tmp_path / "store"))
    server.sync([resolved(counter_tenant({"token": PRIMARY}))])
    assert call(server, PRIMARY, 5) == (200, (5).to_bytes(8, "little"))
    # An operator adds a weak read key (and a rotation key too long for any HTTP header).
    weak = resolved(counter_tenant({"token": PRIMARY, "read-token.ci": b"abc", "token.next": b"n" * 5000}))
    server.sync([weak])
    status = server.shard.status("alpha")
    assert status is not None and status.loaded and status.reason == LOADED
    assert "ignored Secret ns/alpha-token key 'read-token.ci': a token needs at least 8" in status.message
    assert "key 'token.next': a token has at most 4096 characters" in status.message
    assert "abc" not in status.message and "nnnn" not in status.message  # keys named, values never
    assert call(server, PRIMARY, 1)[0] == 200  # still serving with the good key, in its state
    assert call(server, b"abc", 1)[0] == 401  # the ignored key authenticates nothing
    # Fixed: the new key works, nothing was lost on the way.
    fixed = resolved(counter_tenant({"token": PRIMARY, "token.next": b"tok-alpha-next-2"}))
    server.sync([fixed])
    status = server.shard.status("alpha")
    assert status is not None and "ignored" not in status.message
    assert call(server, b"tok-alpha-next-2", 1) == (200, (7).to_bytes(8, "little"))


def test_a_weak_extra_key_added_to_a_sleeping_tenant_keeps_it_asleep_in_its_state(
    runtime_server: Callable[..., RuntimeServer], tmp_path: Path
) -> None:
    server = runtime_server([], sleep_store=SnapshotStore(tmp_path / "store"))
    server.sync([resolved(counter_tenant({"token": PRIMARY}))])
    assert call(server, PRIMARY, 5)[0] == 200
    assert server.run(server.shard.sleep("alpha"))
    server.sync([resolved(counter_tenant({"token": PRIMARY, "read-token.ci": b"abc"}))])
    status = server.shard.status("alpha")
    assert status is not None and status.reason == ASLEEP and "key 'read-token.ci'" in status.message
    assert call(server, PRIMARY, 1) == (200, (6).to_bytes(8, "little"))


def test_a_tenant_unplaced_without_being_deleted_keeps_its_sleep_snapshot(tmp_path: Path) -> None:
    """The operator unplaces a Tenant whose spec became invalid (status.shard cleared): its shard sees
    it leave. Only a deleted Tenant's state goes (at once, or by the orphan sweep); one that left
    otherwise may come back, and comes back asleep in its snapshot (real KubeSource, fake API)."""
    import asyncio

    from tests.fake_kube import FakeKube, until
    from tests.unit.test_kube_source_inprocess import TENANTS, running_source, runtime_of, scenario, tenant

    store = tmp_path / "store"

    async def body(fake: FakeKube) -> None:
        await fake.put(TENANTS, tenant("alpha"))
        async with running_source(fake, sleep_store=SnapshotStore(store), idle_after_s=0.2) as (shard, _, _):
            await fake.wait_for(lambda: runtime_of(fake, "alpha").get("reason") == "Asleep")
            files = store_files(store)
            assert any(p.suffix == ".twsnap" for p in files)
            await fake.put_status(TENANTS, "alpha", {"shard": ""})  # unplaced, not deleted
            await until(lambda: "alpha" not in shard.served)
            assert store_files(store) == files  # record and blob kept
            await fake.put_status(TENANTS, "alpha", {"shard": "tensorwasm-shard-0"})  # valid again
            await until(lambda: "alpha" in shard.served)
            assert shard.served["alpha"].asleep  # back in its snapshot, not fresh
            assert await asyncio.to_thread(shard.served["alpha"].invoke, "echo", b"hi") == b"hi"
            await fake.remove(TENANTS, "alpha")  # deleted: its state goes
            await until(lambda: "alpha" not in shard.served)
            swept = await shard.sweep_sleep_blobs(grace_s=0)
            assert swept is not None and len(swept.removed) == 1
            assert not [p for p in store_files(store) if p.suffix in (".twsnap", ".json")]

    scenario(body)
