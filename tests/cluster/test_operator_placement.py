"""The real operator against the real control plane: placement, spread, resizing, status from shards.

status.runtime is written through the API by the test, standing in for the runtime shard (the
contract's other party); the operator's side is what is under test.
"""

from __future__ import annotations

import collections
import json
from typing import Any

from .conftest import TenantOps, kube_json, tenant_manifest, wait_for

SHARD = "tensorwasm-shard"


def placed_all(tenants: TenantOps, names: list[str], timeout: float = 90) -> dict[str, str]:
    by_name = tenants.wait_phase(names, {"Placed", "Ready"}, timeout)
    return {n: by_name[n]["status"]["shard"] for n in names}


def scale(kube: Any, namespace: str, replicas: int) -> None:
    kube.kubectl("scale", "statefulset", SHARD, "-n", namespace, f"--replicas={replicas}")


def test_fifty_tenants_spread_evenly_within_capacity(
    kube: Any, namespace: str, operator_runner: Any, tenants: TenantOps
) -> None:
    op = operator_runner(shards="2", shard_max_tenants="40", shard_gpu_memory="12Gi")
    names = [f"t{i:02d}" for i in range(50)]
    tenants.apply(*(tenant_manifest(n, limits={"gpuMemory": "128Mi"}) for n in names))
    placement = placed_all(tenants, names)
    counts = collections.Counter(placement.values())
    assert set(counts) == {f"{SHARD}-0", f"{SHARD}-1"}
    assert max(counts.values()) <= 32  # 1.25 x the mean of 25: even, not just "fits"
    assert all(c <= 40 for c in counts.values())
    # Each tenant's Service selects exactly its shard pod; each has a token Secret.
    services = {s["metadata"]["name"]: s for s in tenants.owned("services")}
    for name, shard in placement.items():
        assert services[f"tw-{name}"]["spec"]["selector"] == {"statefulset.kubernetes.io/pod-name": shard}
    secrets = {s["metadata"]["name"] for s in tenants.owned("secrets")}
    assert secrets == {f"tw-{n}-token" for n in names}
    one = kube_json(kube, "get", "tenant", "t00", "-n", namespace)
    assert one["status"]["tokenSecretName"] == "tw-t00-token"
    assert one["status"]["endpoint"] == f"http://tw-t00.{namespace}.svc:80"
    assert {c["type"]: c["status"] for c in one["status"]["conditions"]} == {
        "Placed": "True",
        "ModuleReady": "Unknown",
        "Ready": "False",
    }
    # The shard StatefulSet and its headless Service exist, with the configured replicas.
    sts = kube_json(kube, "get", "statefulset", SHARD, "-n", namespace)
    assert sts["spec"]["replicas"] == 2
    op.assert_alive()


def test_insufficient_capacity_stays_pending_naming_the_resource(
    kube: Any, namespace: str, operator_runner: Any, tenants: TenantOps
) -> None:
    operator_runner(shards="2", shard_gpu_memory="3Gi")
    tenants.apply(*(tenant_manifest(f"g{i}", limits={"gpuMemory": "1Gi"}) for i in range(4)))
    placed_all(tenants, [f"g{i}" for i in range(4)])
    tenants.apply(tenant_manifest("big", limits={"gpuMemory": "1Gi"}))
    got = tenants.wait_phase(["big"], "Pending")["big"]
    placed = next(c for c in got["status"]["conditions"] if c["type"] == "Placed")
    assert placed["reason"] == "InsufficientCapacity"
    assert "insufficient gpuMemory" in placed["message"]
    row = next(line for line in kube.kubectl("get", "tenants", "-n", namespace).splitlines() if "big" in line)
    assert "Pending" in row
    events = kube.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=big")
    assert "InsufficientCapacity" in events
    # Freeing room places it without any edit of the pending tenant.
    kube.kubectl("delete", "tenant", "g0", "-n", namespace)
    tenants.wait_phase(["big"], "Placed")


def play_shards(kube: Any, namespace: str, tenants: TenantOps) -> bool:
    """Write what shards write for each move in flight (the source's capture of the move Snapshot,
    the target's report); True when no Tenant records a move (status.move)."""
    moving = [t for t in tenants.all() if (t.get("status") or {}).get("move")]
    for t in moving:
        move = t["status"]["move"]
        if move.get("phase") == "Holding":
            status = json.dumps({"status": {"phase": "Ready", "shard": move["source"]}})
            kube.kubectl("patch", "snapshot", move["snapshot"], "-n", namespace, "--subresource=status",
                         "--type=merge", "-p", status, check=False)  # fmt: skip
        elif move.get("phase") == "Restoring":
            tenants.report(t["metadata"]["name"], move["target"])
    return not moving


def test_scaling_moves_the_minimum(
    kube: Any, namespace: str, operator_runner: Any, tenants: TenantOps
) -> None:
    # No shard processes here: play_shards writes what they would for each move in flight
    # (tests/e2e/test_moves.py runs moves through real shards).
    operator_runner(shards="2", shard_max_tenants="100", move_snapshot_timeout="120")
    names = [f"m{i:02d}" for i in range(50)]
    tenants.apply(*(tenant_manifest(n) for n in names))
    before = placed_all(tenants, names)

    def shards_when(predicate: Any) -> Any:
        def check() -> dict[str, str | None] | None:
            current = tenants.shards()
            return current if predicate(current) else None

        return check

    scale(kube, namespace, 3)
    # Every move has landed once no Tenant records one in flight (status.move).
    wait_for(
        lambda: play_shards(kube, namespace, tenants) and shards_when(lambda s: f"{SHARD}-2" in s.values())(),
        90,
        "moves onto the new shard landed",
    )
    after: dict[str, str] = tenants.shards()  # type: ignore[assignment]
    moved = [n for n in names if before[n] != after[n]]
    assert 0 < len(moved) <= 0.4 * len(names), moved
    assert all(after[n] == f"{SHARD}-2" for n in moved)

    scale(kube, namespace, 2)
    on_removed = {n for n in names if after[n] == f"{SHARD}-2"}
    final: dict[str, str] = wait_for(
        lambda: (
            play_shards(kube, namespace, tenants) and shards_when(lambda s: f"{SHARD}-2" not in s.values())()
        ),
        90,
        "the removed shard drained",
    )
    changed = {n for n in names if final[n] != after[n]}
    assert changed == on_removed
    services = {s["metadata"]["name"]: s for s in tenants.owned("services")}
    wait_for(
        lambda: all(
            json.loads(kube.kubectl("get", "svc", f"tw-{n}", "-n", namespace, "-o", "json"))["spec"][
                "selector"
            ]["statefulset.kubernetes.io/pod-name"]
            == final[n]
            for n in sorted(on_removed)[:5]
        ),
        30,
        "Services re-pointed",
    )
    assert len(services) == 50


def test_status_follows_the_shard_report(
    kube: Any, namespace: str, operator_runner: Any, tenants: TenantOps
) -> None:
    operator_runner(shards="1")
    tenants.apply(tenant_manifest("good", limits={"gpuMemory": "64Mi"}), tenant_manifest("bad"))
    placed_all(tenants, ["good", "bad"])
    tenants.report("good", f"{SHARD}-0", gpu=1 << 20)
    tenants.report("bad", f"{SHARD}-0", loaded=False, reason="ModuleRejected", message="digest mismatch")
    got = tenants.wait_phase(["good"], "Ready")["good"]
    assert got["status"]["gpuBytesInUse"] == 1 << 20
    assert {c["type"]: c["status"] for c in got["status"]["conditions"]}["Ready"] == "True"
    bad = tenants.wait_phase(["bad"], "Degraded")["bad"]
    module = next(c for c in bad["status"]["conditions"] if c["type"] == "ModuleReady")
    assert (module["reason"], module["message"]) == ("ModuleRejected", "digest mismatch")
    row = next(
        line for line in kube.kubectl("get", "tenants", "-n", namespace).splitlines() if "good" in line
    )
    assert row.split()[1:6] == ["Ready", f"{SHARD}-0", "64Mi", "1Mi", "True"]  # GPU-USED in human units
    # A new generation is not Ready until the shard reports that generation.
    kube.kubectl("patch", "tenant", "good", "-n", namespace, "--type=merge", "-p",
                 json.dumps({"spec": {"functions": ["echo", "sum"]}}))  # fmt: skip
    tenants.wait_phase(["good"], "Placed")
    tenants.report("good", f"{SHARD}-0")
    tenants.wait_phase(["good"], "Ready")
