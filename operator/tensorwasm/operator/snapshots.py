"""Snapshot decisions of the operator: which Snapshots to create, keep, delete and report.

Owns the Snapshot objects the operator creates (moves, Periodic policy), retention (the newest
`retain` Ready Snapshots of a tenant stay), `status.lastSnapshot`, and the status of a Snapshot
naming no Tenant. Shards capture and restore (runtime/.../snapshots/kube.py); this module only
decides. Pure: must not import kopf or kube/, and takes the time from its callers.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from tensorwasm.operator.desired.meta import (
    LABEL_MANAGED_BY,
    LABEL_TENANT,
    MANAGED_BY,
    tenant_owner_reference,
)
from tensorwasm.operator.models import Tenant

SNAPSHOT_API_VERSION = "tensorwasm.io/v1alpha1"
LABEL_PURPOSE = "tensorwasm.io/purpose"
MOVE, PERIODIC = "move", "periodic"
READY, FAILED = "Ready", "Failed"
TENANT_NOT_FOUND = "TenantNotFound"

JSON = dict[str, Any]


def parse_time(value: str) -> datetime.datetime:
    return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def short_id(*parts: str) -> str:
    """Six hex digits naming one operator-made Snapshot (unique per tenant uid, purpose and time)."""
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=3).hexdigest()


def snapshot_name(tenant: str, purpose: str, short: str) -> str:
    return f"{tenant}-{purpose}-{short}"


def build_snapshot(tenant: Tenant, name: str, purpose: str) -> JSON:
    """A Snapshot of `tenant` owned by it (the garbage collector removes it with the Tenant)."""
    return {
        "apiVersion": SNAPSHOT_API_VERSION,
        "kind": "Snapshot",
        "metadata": {
            "name": name,
            "namespace": tenant.namespace,
            "labels": {LABEL_PURPOSE: purpose, LABEL_TENANT: tenant.name, LABEL_MANAGED_BY: MANAGED_BY},
            "ownerReferences": [{**tenant_owner_reference(tenant), "controller": False}],
        },
        "spec": {"tenant": tenant.name},
    }


def tenant_of(snapshot: Mapping[str, Any]) -> str:
    return str((snapshot.get("spec") or {}).get("tenant", ""))


def phase_of(snapshot: Mapping[str, Any]) -> str:
    return str((snapshot.get("status") or {}).get("phase") or "")


def deleting(snapshot: Mapping[str, Any]) -> bool:
    return bool((snapshot.get("metadata") or {}).get("deletionTimestamp"))


def _created(snapshot: Mapping[str, Any]) -> tuple[str, str]:
    meta = snapshot.get("metadata") or {}
    return str(meta.get("creationTimestamp") or ""), str(meta.get("name") or "")


def ready_snapshots(tenant: str, snapshots: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The tenant's Ready Snapshots that are not being deleted, newest first."""
    mine = [s for s in snapshots if tenant_of(s) == tenant and phase_of(s) == READY and not deleting(s)]
    return sorted(mine, key=_created, reverse=True)


def ready_time(snapshot: Mapping[str, Any]) -> str:
    """When the snapshot became Ready (its Ready condition), else when it was created."""
    for cond in (snapshot.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == READY and cond.get("lastTransitionTime"):
            return str(cond["lastTransitionTime"])
    return _created(snapshot)[0]


def last_snapshot(tenant: str, snapshots: Iterable[Mapping[str, Any]]) -> JSON | None:
    """status.lastSnapshot: the newest Ready Snapshot's name and time (None: there is none)."""
    ready = ready_snapshots(tenant, snapshots)
    if not ready:
        return None
    return {"name": ready[0]["metadata"]["name"], "time": ready_time(ready[0])}


def retention_victims(
    tenant: str, snapshots: Iterable[Mapping[str, Any]], retain: int, keep: str | None = None
) -> list[str]:
    """Names of the tenant's Ready Snapshots beyond the newest `retain` (never `keep`, restoreFrom)."""
    return [
        s["metadata"]["name"]
        for s in ready_snapshots(tenant, snapshots)[retain:]
        if s["metadata"]["name"] != keep
    ]


def periodic_wait_s(
    tenant: str, snapshots: Iterable[Mapping[str, Any]], interval_s: int, since: str, now: str
) -> float:
    """Seconds until the next Periodic Snapshot is due (<= 0: create one now).

    Counted from the tenant's newest Snapshot of any purpose that did not fail, else from `since`
    (when the tenant was created): a manual Snapshot also resets the period.
    """
    times = [_created(s)[0] for s in snapshots if tenant_of(s) == tenant and phase_of(s) != FAILED]
    start = max([t for t in times if t] or [since])
    elapsed = (parse_time(now) - parse_time(start)).total_seconds()
    return interval_s - elapsed


def tenant_not_found_status(tenant: str, generation: int, now: str) -> JSON:
    """Status for a Snapshot naming no Tenant of its namespace (no shard will ever capture it)."""
    message = f"Tenant {tenant!r} does not exist in this namespace"
    return {
        "phase": FAILED,
        "reason": TENANT_NOT_FOUND,
        "message": message,
        "conditions": [
            {
                "type": READY,
                "status": "False",
                "reason": TENANT_NOT_FOUND,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": now,
            }
        ],
    }
