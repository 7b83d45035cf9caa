"""Snapshot decisions of the operator: which Snapshots to create, keep, delete and report.

Owns the Snapshot objects the operator creates (moves, Periodic policy), retention (the newest
`retain` Ready Snapshots of a tenant stay; which is newest is tensorwasm.api.snapshot's),
`status.lastSnapshot`, and the status of a Snapshot naming no Tenant. Shards capture and restore
(runtime/.../snapshots/kube.py); this module only decides. Pure: must not import kopf or kube/,
and takes the time from its callers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from tensorwasm.api.conditions import Condition, condition_dict
from tensorwasm.api.group import API_VERSION, LABEL_PURPOSE, LABEL_TENANT, SNAPSHOT
from tensorwasm.api.snapshot import (
    FAILED,
    READY,
    created_key,
    phase_of,
    ready_snapshots,
    ready_time,
    tenant_of,
)
from tensorwasm.api.stamps import parse_rfc3339
from tensorwasm.api.tenant import Tenant
from tensorwasm.operator.desired.meta import LABEL_MANAGED_BY, MANAGED_BY, tenant_owner_reference

MOVE, PERIODIC = "move", "periodic"
TENANT_NOT_FOUND = "TenantNotFound"

JSON = dict[str, Any]


def short_id(*parts: str) -> str:
    """Six hex digits naming one operator-made Snapshot (unique per tenant uid, purpose and time)."""
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=3).hexdigest()


def snapshot_name(tenant: str, purpose: str, short: str) -> str:
    return f"{tenant}-{purpose}-{short}"


def build_snapshot(tenant: Tenant, name: str, purpose: str) -> JSON:
    """A Snapshot of `tenant` owned by it (the garbage collector removes it with the Tenant)."""
    return {
        "apiVersion": API_VERSION,
        "kind": SNAPSHOT.kind,
        "metadata": {
            "name": name,
            "namespace": tenant.namespace,
            "labels": {LABEL_PURPOSE: purpose, LABEL_TENANT: tenant.name, LABEL_MANAGED_BY: MANAGED_BY},
            "ownerReferences": [{**tenant_owner_reference(tenant), "controller": False}],
        },
        "spec": {"tenant": tenant.name},
    }


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
    times = [created_key(s)[0] for s in snapshots if tenant_of(s) == tenant and phase_of(s) != FAILED]
    start = max([t for t in times if t] or [since])
    elapsed = (parse_rfc3339(now) - parse_rfc3339(start)).total_seconds()
    return interval_s - elapsed


def tenant_not_found_status(tenant: str, generation: int, now: str) -> JSON:
    """Status for a Snapshot naming no Tenant of its namespace (no shard will ever capture it)."""
    message = f"Tenant {tenant!r} does not exist in this namespace"
    return {
        "phase": FAILED,
        "reason": TENANT_NOT_FOUND,
        "message": message,
        "conditions": [condition_dict(Condition(READY, "False", TENANT_NOT_FOUND, message), generation, now)],
    }
