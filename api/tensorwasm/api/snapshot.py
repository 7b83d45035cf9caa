"""The Snapshot resource: its spec model, phases, and which Ready Snapshot is the newest.

Owns `SnapshotSpec`, the phases, and the selection both sides make: the operator reports the
newest Ready Snapshot in status.lastSnapshot and keeps the newest `retain`; a shard restores
spec.restoreFrom, else that same newest Ready Snapshot. Pure; imports only tensorwasm.api.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from tensorwasm.api.fields import Rule, parse_model, string
from tensorwasm.api.names import TENANT_NAME_MAX

PENDING, CAPTURING, READY, FAILED = "Pending", "Capturing", "Ready", "Failed"
PHASES = (PENDING, CAPTURING, READY, FAILED)


@dataclass(frozen=True, kw_only=True)
class SnapshotSpec:
    """Which Tenant (same namespace) to capture; fixed once created."""

    RULES: ClassVar = (Rule("self.tenant == oldSelf.tenant", "spec.tenant is immutable"),)
    tenant: str = string(
        "tenant", "Name of the Tenant (same namespace) to capture.", required=True, min_length=1,
        max_length=TENANT_NAME_MAX,
    )  # fmt: skip


def parse_snapshot_spec(spec: object) -> SnapshotSpec:
    return parse_model(SnapshotSpec, spec, "spec")


def tenant_of(snapshot: Mapping[str, Any]) -> str:
    return str((snapshot.get("spec") or {}).get("tenant", ""))


def phase_of(snapshot: Mapping[str, Any]) -> str:
    return str((snapshot.get("status") or {}).get("phase") or "")


def is_deleting(snapshot: Mapping[str, Any]) -> bool:
    return bool((snapshot.get("metadata") or {}).get("deletionTimestamp"))


def name_of(snapshot: Mapping[str, Any]) -> str:
    return str((snapshot.get("metadata") or {}).get("name") or "")


def created_key(snapshot: Mapping[str, Any]) -> tuple[str, str]:
    """Newest-last order: creation stamp, then name (stamps have whole seconds only)."""
    return str((snapshot.get("metadata") or {}).get("creationTimestamp") or ""), name_of(snapshot)


def ready_snapshots(tenant: str, snapshots: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The tenant's Ready Snapshots that are not being deleted, newest first."""
    mine = [s for s in snapshots if tenant_of(s) == tenant and phase_of(s) == READY and not is_deleting(s)]
    return sorted(mine, key=created_key, reverse=True)


def ready_time(snapshot: Mapping[str, Any]) -> str:
    """When the snapshot became Ready (its Ready condition), else when it was created."""
    for cond in (snapshot.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == READY and cond.get("lastTransitionTime"):
            return str(cond["lastTransitionTime"])
    return created_key(snapshot)[0]


def restore_choice(
    tenant: str, restore_from: str | None, snapshots: Iterable[Mapping[str, Any]]
) -> tuple[Mapping[str, Any] | None, str]:
    """The Snapshot a starting Tenant restores: restoreFrom if Ready, else its newest Ready one.

    (None, why) when there is none to restore.
    """
    ready = ready_snapshots(tenant, snapshots)
    if restore_from:
        chosen = next((s for s in ready if name_of(s) == restore_from), None)
        why = "" if chosen else f"restoreFrom names Snapshot {restore_from!r}, which is not a Ready snapshot"
        return chosen, why
    return (ready[0], "") if ready else (None, "no Ready snapshot")
