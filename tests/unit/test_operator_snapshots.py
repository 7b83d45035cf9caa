"""The operator's Snapshot decisions (retention, lastSnapshot, Periodic timing, builders), by equality."""

from __future__ import annotations

from typing import Any

from tensorwasm.api.tenant import parse_tenant
from tensorwasm.operator.snapshots import (
    build_snapshot,
    last_snapshot,
    periodic_wait_s,
    retention_victims,
    tenant_not_found_status,
)


def snap(name: str, created: str, phase: str = "Ready", tenant: str = "a", **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "creationTimestamp": created, **meta},
        "spec": {"tenant": tenant},
        "status": {"phase": phase},
    }


SNAPS = [
    snap("s1", "2026-01-01T00:00:01Z"),
    snap("s2", "2026-01-01T00:00:02Z"),
    snap("s3", "2026-01-01T00:00:03Z", phase="Failed"),
    snap("s4", "2026-01-01T00:00:04Z"),
    snap("s5", "2026-01-01T00:00:05Z", deletionTimestamp="2026-01-01T00:00:09Z"),
    snap("b1", "2026-01-01T00:00:09Z", tenant="b"),
]


def test_retention_keeps_the_newest_ready_and_restore_from() -> None:
    assert retention_victims("a", SNAPS, 1) == ["s2", "s1"]
    assert retention_victims("a", SNAPS, 1, keep="s1") == ["s2"]
    assert retention_victims("a", SNAPS, 3) == []


def test_last_snapshot_is_the_newest_ready_one() -> None:
    ready = snap("s6", "2026-01-01T00:00:06Z")
    ready["status"]["conditions"] = [{"type": "Ready", "lastTransitionTime": "2026-01-01T00:00:07Z"}]
    assert last_snapshot("a", SNAPS) == {"name": "s4", "time": "2026-01-01T00:00:04Z"}
    assert last_snapshot("a", [*SNAPS, ready]) == {"name": "s6", "time": "2026-01-01T00:00:07Z"}
    assert last_snapshot("c", SNAPS) is None


def test_periodic_counts_from_the_newest_snapshot_that_did_not_fail() -> None:
    since = "2026-01-01T00:00:00Z"
    assert (
        periodic_wait_s("a", SNAPS, 60, since, "2026-01-01T00:00:30Z") == 35
    )  # from s5 (any phase but Failed)
    assert periodic_wait_s("c", SNAPS, 60, since, "2026-01-01T00:01:00Z") == 0
    assert periodic_wait_s("c", [], 60, since, "2026-01-01T00:02:00Z") == -60


def test_operator_snapshots_are_owned_and_labelled() -> None:
    tenant = parse_tenant({
        "metadata": {"name": "a", "namespace": "ns", "uid": "u1"},
        "spec": {"module": {"url": "https://x/m.wasm", "sha256": "0" * 64}, "functions": ["f"]},
    })  # fmt: skip
    obj = build_snapshot(tenant, "a-move-abc123", "move")
    assert obj["metadata"]["labels"]["tensorwasm.io/purpose"] == "move"
    assert obj["metadata"]["ownerReferences"] == [
        {"apiVersion": "tensorwasm.io/v1alpha1", "kind": "Tenant", "name": "a", "uid": "u1",
         "controller": False, "blockOwnerDeletion": True}
    ]  # fmt: skip
    assert obj["spec"] == {"tenant": "a"}


def test_tenant_not_found_status_is_final_and_readable() -> None:
    status = tenant_not_found_status("ghost", 1, "2026-01-01T00:00:00Z")
    assert (status["phase"], status["reason"]) == ("Failed", "TenantNotFound")
    assert status["message"] == "Tenant 'ghost' does not exist in this namespace"
