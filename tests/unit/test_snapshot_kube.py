"""Snapshot resources on a shard: capture sets status + finalizer, delete removes the blob, restore on start.

The Kubernetes API is the only stand-in (a recorder of the merge patches the agent sends); the
engine, CPU backend, store and pipeline are real.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.api.conditions import human_bytes
from tensorwasm.runtime.accel.cpu import CpuAccelerator
from tensorwasm.runtime.engine import CompiledModule, Engine, GuestLimits, TenantInstancePool, WasmState
from tensorwasm.runtime.snapshots import kube
from tensorwasm.runtime.snapshots.store import SnapshotStore


class RecordingApi:
    """Records merge patches like the API server would receive them (KubeApi.merge_patch)."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, str, dict[str, Any]]] = []

    async def merge_patch(self, path: str, patch: dict[str, Any], want_body: bool = True) -> dict[str, Any]:
        parts = path.strip("/").split("/")
        assert parts[:3] == ["apis", "tensorwasm.io", "v1alpha1"] and parts[5] == "snapshots"
        self.patches.append(("status" if parts[-1] == "status" else "object", parts[6], patch))
        return {}


def reconcile(agent: kube.SnapshotAgent, snapshot: dict[str, Any], handle: kube.TenantHandle | None) -> str:
    return asyncio.run(agent.reconcile(snapshot, handle))


@pytest.fixture(scope="module")
def module(stateful_module: CompiledModule) -> CompiledModule:
    return stateful_module  # tests/conftest.py


def handle(engine: Engine, module: CompiledModule, acc: CpuAccelerator, name: str) -> kube.TenantHandle:
    device = acc.open_tenant(name, 8 << 20)
    pool = TenantInstancePool(
        engine, module, GuestLimits(memory_bytes=1 << 20), device=device, tenant_id=name
    )
    return kube.TenantHandle(name, "uid-" + name.split("-")[0], module.sha256, 2, pool, device)


def snapshot_obj(name: str, tenant: str, **extra: Any) -> dict[str, Any]:
    created = extra.pop("created", "2026-11-23T12:00:00Z")
    meta = {
        "name": name,
        "namespace": "ns",
        "generation": 1,
        "resourceVersion": "7",
        "creationTimestamp": created,
    }
    meta.update(extra.pop("meta", {}))
    return {"metadata": meta, "spec": {"tenant": tenant}, **extra}


def test_capture_then_delete_then_restore_on_start(
    engine: Engine, module: CompiledModule, tmp_path: Path
) -> None:
    acc = CpuAccelerator()
    api, store = RecordingApi(), SnapshotStore(tmp_path)
    agent = kube.SnapshotAgent(api, store, "tensorwasm-shard-0", acc)
    src = handle(engine, module, acc, "alpha-src")
    state = src.pool.capture_state()
    memory = random.Random(1).randbytes(2 * 65536)
    src.pool.restore_state(WasmState(memory=memory, globals=[(n, t, 5) for n, t, _ in state.globals]))
    buf = src.device.alloc(3000) if src.device else 0
    assert src.device is not None
    src.device.write(buf, 0, b"w" * 3000)

    snap = snapshot_obj("snap-1", "alpha")
    assert reconcile(agent, snap, src) == "captured"
    kinds = [(k, list(body)) for k, _, body in api.patches]
    assert (
        kinds[0] == ("object", ["metadata"]) and kube.FINALIZER in api.patches[0][2]["metadata"]["finalizers"]
    )
    assert api.patches[1][2]["status"]["phase"] == "Capturing"
    ready = api.patches[-1][2]["status"]
    assert ready["phase"] == "Ready" and ready["shard"] == "tensorwasm-shard-0"
    assert ready["sizeBytes"] >= len(memory) + 3000 and ready["storedBytes"] > 0
    # kubectl's SIZE and STORED columns read the human forms of the same counts.
    assert (ready["size"], ready["stored"]) == (
        human_bytes(ready["sizeBytes"]),
        human_bytes(ready["storedBytes"]),
    )
    assert ready["size"].endswith("Ki")
    assert Path(ready["location"]).is_file() and ready["location"].endswith(ready["checksum"] + ".twsnap")
    assert set(ready["durations"]) >= {"barrier", "encode", "commit", "total"}

    # A re-list of the Ready snapshot changes nothing.
    done = snapshot_obj("snap-1", "alpha", status=ready, meta={"finalizers": [kube.FINALIZER]})
    count = len(api.patches)
    assert reconcile(agent, done, src) == "none" and len(api.patches) == count

    # A Tenant starting on this shard restores its newest Ready snapshot.
    dst = handle(engine, module, acc, "alpha-dst")
    tenant_obj = {"metadata": {"name": "alpha"}, "spec": {}}
    result, why = agent.restore_on_start(dst, tenant_obj, [done])
    assert result is not None, why
    assert bytes(dst.pool.capture_state().memory) == memory
    assert dst.device is not None and dst.device.read(buf, 0, 3000) == b"w" * 3000

    # Deleting the Snapshot removes the blob, then the finalizer.
    gone = {"finalizers": [kube.FINALIZER, "other"], "deletionTimestamp": "now"}
    deleting = snapshot_obj("snap-1", "alpha", status=ready, meta=gone)
    assert reconcile(agent, deleting, None) == "deleted"
    assert not Path(ready["location"]).exists()
    assert api.patches[-1][2]["metadata"]["finalizers"] == ["other"]
    assert agent.restore_on_start(dst, tenant_obj, []) == (None, "no Ready snapshot")
    acc.close()


def test_capture_failure_is_reported(engine: Engine, module: CompiledModule, tmp_path: Path) -> None:
    acc = CpuAccelerator()
    api = RecordingApi()
    src = handle(engine, module, acc, "beta-src")
    bad = kube.TenantHandle("beta", "not/a/uid", src.module_sha256, 1, src.pool, src.device)
    agent = kube.SnapshotAgent(api, SnapshotStore(tmp_path), "shard-1", acc)
    assert reconcile(agent, snapshot_obj("s", "beta"), bad) == "failed"
    failed = api.patches[-1][2]["status"]
    assert failed["phase"] == "Failed" and "tenant uid" in failed["message"]
    acc.close()


def test_pick_restore_prefers_restore_from_then_newest_ready() -> None:
    ready = {"phase": "Ready", "checksum": "0" * 32}
    old = snapshot_obj("old", "t", status=ready, created="2026-11-01T00:00:00Z")
    new = snapshot_obj("new", "t", status=ready, created="2026-11-20T00:00:00Z")
    pending = snapshot_obj("pending", "t", status={"phase": "Capturing"}, created="2026-11-22T00:00:00Z")
    other = snapshot_obj("other", "u", status=ready, created="2026-11-23T00:00:00Z")
    tenant = {"metadata": {"name": "t"}, "spec": {}}
    assert kube.pick_restore(tenant, [old, new, pending, other])[0] is new
    pinned = {"metadata": {"name": "t"}, "spec": {"restoreFrom": "old"}}
    assert kube.pick_restore(pinned, [old, new])[0] is old
    missing = {"metadata": {"name": "t"}, "spec": {"restoreFrom": "pending"}}
    chosen, why = kube.pick_restore(missing, [pending])
    assert chosen is None and "not a Ready snapshot" in why
