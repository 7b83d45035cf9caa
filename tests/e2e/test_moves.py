"""Tenants move between running shards through Snapshots: 2 -> 3 shards and back, on the real stack.

The operator and real shard processes (LocalStack): growing the StatefulSet moves a minority of
tenants, each only after its move Snapshot is Ready on the source shard; the new shard serves
them with the same token. Shrinking moves the removed shard's tenants back at once.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from tensorwasm.dev.stack import LocalStack, invoke
from tests.conftest import Kube, wait_for
from tests.e2e.conftest import apply_module, get

TENANTS = 10
SHARD_0, SHARD_1, SHARD_2 = (f"tensorwasm-shard-{i}" for i in range(3))


def tenant(name: str, sha: str) -> dict[str, Any]:
    return {
        "apiVersion": "tensorwasm.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {
            "module": {"configMapRef": {"name": "echo-module", "key": "module.wasm"}, "sha256": sha},
            "functions": ["echo"],
            "limits": {"gpuMemory": "16Mi", "linearMemory": "1Mi", "maxConcurrency": 1},
        },
    }


def observe(kube: Kube, namespace: str) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    # Tenants first: a move seen here had its Snapshot Ready before, so the later list shows it.
    tenants = {t["metadata"]["name"]: t for t in get(kube, namespace, "tenants")["items"]}
    snapshots = {s["metadata"]["name"]: s for s in get(kube, namespace, "snapshots")["items"]}
    return tenants, snapshots


def settled(stack: LocalStack, tenants: dict[str, dict[str, Any]], shards: set[str]) -> bool:
    stack.check_alive()
    return len(tenants) == TENANTS and all(
        t.get("status", {}).get("phase") == "Ready"
        and t["status"].get("shard") in shards
        and t["status"].get("runtime", {}).get("shard") == t["status"]["shard"]
        and "move" not in t["status"]
        for t in tenants.values()
    )


def tokens(kube: Kube, namespace: str) -> dict[str, str]:
    out = {}
    for i in range(TENANTS):
        secret = get(kube, namespace, "secret", f"tw-m{i}-token")
        out[f"m{i}"] = base64.b64decode(secret["data"]["token"]).decode()
    return out


def test_grow_and_shrink_move_through_snapshots(kube: Kube, namespace: str, stack: LocalStack) -> None:
    sha = apply_module(kube, namespace, "echo")
    items = [tenant(f"m{i}", sha) for i in range(TENANTS)]
    listed = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    kube.kubectl("apply", "-n", namespace, "-f", "-", input_text=listed)
    ghost = {"apiVersion": "tensorwasm.io/v1alpha1", "kind": "Snapshot",
             "metadata": {"name": "ghost-1"}, "spec": {"tenant": "ghost"}}  # fmt: skip
    kube.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(ghost))
    first = wait_for(
        lambda: (lambda t: t if settled(stack, t, {SHARD_0, SHARD_1}) else None)(observe(kube, namespace)[0]),
        90, "tenants Ready on two shards",
    )  # fmt: skip
    before = {n: t["status"]["shard"] for n, t in first.items()}
    token = tokens(kube, namespace)
    for name, shard in before.items():
        assert invoke(stack.shard_port(shard), token[name], "echo", name.encode()) == (200, name.encode())
    ghost_status = get(kube, namespace, "snapshot", "ghost-1").get("status", {})
    assert (ghost_status.get("phase"), ghost_status.get("reason")) == ("Failed", "TenantNotFound")

    # Grow: a third shard process, then the StatefulSet (as an HPA or `kubectl scale` would).
    stack.start_shard(2)
    kube.kubectl("scale", "statefulset", "tensorwasm-shard", "--replicas=3", "-n", namespace)
    moved: dict[str, str] = {}  # tenant -> its move Snapshot, checked Ready when the move was seen
    deadline = time.monotonic() + 90
    while True:
        tenants, snapshots = observe(kube, namespace)
        for name, t in tenants.items():
            shard = t.get("status", {}).get("shard")
            if shard != before[name] and name not in moved:
                assert shard == SHARD_2, f"{name} moved between old shards: {before[name]} -> {shard}"
                mine = [s for s in snapshots.values() if s["spec"]["tenant"] == name
                        and s["metadata"]["name"].startswith(f"{name}-move-")]  # fmt: skip
                assert [s.get("status", {}).get("phase") for s in mine] == ["Ready"], (name, mine)
                assert mine[0]["metadata"]["labels"]["tensorwasm.io/purpose"] == "move"
                assert mine[0]["status"]["shard"] == before[name], "captured on the source shard"
                moved[name] = mine[0]["metadata"]["name"]
        if moved and settled(stack, tenants, {SHARD_0, SHARD_1, SHARD_2}):
            break
        assert time.monotonic() < deadline, f"moves did not settle; moved={moved}"
        time.sleep(0.25)
    assert 0 < len(moved) <= 0.4 * TENANTS, moved
    for name in moved:
        last = tenants[name]["status"].get("lastSnapshot") or {}
        assert last.get("name") == moved[name]
        assert invoke(stack.shard_port(SHARD_2), token[name], "echo", b"hi") == (200, b"hi")
    for name in set(before) - set(moved):
        assert tenants[name]["status"]["shard"] == before[name], "unmoved tenants stay put"

    # Shrink: the StatefulSet first, then the third shard's process goes (its pod would).
    kube.kubectl("scale", "statefulset", "tensorwasm-shard", "--replicas=2", "-n", namespace)
    stack.processes.pop(SHARD_2).stop()
    back = wait_for(
        lambda: (lambda t: t if settled(stack, t, {SHARD_0, SHARD_1}) else None)(observe(kube, namespace)[0]),
        60, "tenants back on two shards",
    )  # fmt: skip
    for name, t in back.items():
        shard = t["status"]["shard"]
        if name not in moved:
            assert shard == before[name], "3 -> 2 moves only the removed shard's tenants"
        assert invoke(stack.shard_port(shard), token[name], "echo", b"again") == (200, b"again")
