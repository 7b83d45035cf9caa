"""The Kubernetes side of snapshots on a shard: Snapshot resources in, captures and restores out.

Owns the pure status builders for `Snapshot` (the resource, its phases and the restore choice are
tensorwasm.api's) and
`SnapshotAgent`, which the shard's Kubernetes source calls (on its event loop) for
every Snapshot whose `spec.tenant` is served here, for every deleted Snapshot `blob_deleter`
names this shard for, and once when a Tenant starts on this shard:
- a new Snapshot: add the finalizer, status Capturing, capture, then status Ready (sizeBytes,
  storedBytes, checksum, location, durations) or Failed with the reason;
- a deleted Snapshot: delete its blob, then drop the finalizer (the API server then removes it).
  The store is shared by all shards (one ReadWriteMany volume), so any live shard can do this:
  `blob_deleter` picks exactly one, also when the shard that captured it is gone;
- a Tenant starting: restore `spec.restoreFrom`, else its newest Ready Snapshot, when the blob is here.
Level-triggered: a Ready or Failed Snapshot is never captured again, so a re-list changes nothing.
Captures run in a worker thread (blocking); API writes go through the project's one client
(tensorwasm.kube.client.KubeApi, or anything with its `merge_patch`). Must not import wasmtime or cuda.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tensorwasm.api.conditions import Condition, condition_dict, human_bytes, truncate_message
from tensorwasm.api.group import API_VERSION, SNAPSHOT
from tensorwasm.api.group import SNAPSHOT_BLOB_FINALIZER as FINALIZER
from tensorwasm.api.names import shard_sort_key
from tensorwasm.api.snapshot import CAPTURING as PHASE_CAPTURING
from tensorwasm.api.snapshot import FAILED, READY, is_deleting, phase_of, restore_choice
from tensorwasm.api.stamps import now_rfc3339
from tensorwasm.kube.client import resource_path
from tensorwasm.runtime.accel.base import Accelerator, TenantDevice
from tensorwasm.runtime.errors import NotFound, RuntimeFault, SnapshotRejected
from tensorwasm.runtime.snapshots.capture import CaptureResult, capture_snapshot
from tensorwasm.runtime.snapshots.pipeline import SnapshotPool
from tensorwasm.runtime.snapshots.restore import RestoreResult, restore_snapshot
from tensorwasm.runtime.snapshots.store import SnapshotStore

log = logging.getLogger(__name__)

# Condition reasons (CamelCase constants, as the operator uses them).
CAPTURED, CAPTURE_FAILED, CAPTURING = "Captured", "CaptureFailed", "Capturing"


class Patcher(Protocol):
    """The one call of tensorwasm.kube.client.KubeApi the agent makes."""

    async def merge_patch(self, path: str, patch: Mapping[str, Any], want_body: bool = True) -> Any: ...


@dataclass(frozen=True)
class TenantHandle:
    """What the agent needs of a tenant served on this shard."""

    name: str
    uid: str  # the Tenant's metadata.uid: blobs bind to it, so a re-created Tenant starts fresh
    module_sha256: str
    generation: int
    pool: SnapshotPool
    device: TenantDevice | None = None


# --- pure ----------------------------------------------------------------------------------------


def _condition(ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return condition_dict(Condition(READY, str(ok), reason, message), generation, now_rfc3339())


def build_capturing_status(shard: str, generation: int) -> dict[str, Any]:
    return {
        "phase": PHASE_CAPTURING,
        "shard": shard,
        "conditions": [_condition(False, CAPTURING, "capture in progress", generation)],
    }


def build_ready_status(result: CaptureResult, shard: str, generation: int) -> dict[str, Any]:
    return {
        "phase": READY,
        "shard": shard,
        "sizeBytes": result.manifest.raw_bytes,
        "storedBytes": result.size_bytes,
        "size": human_bytes(result.manifest.raw_bytes),
        "stored": human_bytes(result.size_bytes),
        "checksum": result.digest,
        "location": str(result.path),
        "message": "",
        "durations": {phase: round(seconds, 6) for phase, seconds in result.timings.items()},
        "conditions": [
            _condition(
                True,
                CAPTURED,
                f"captured {human_bytes(result.manifest.raw_bytes)} ({result.manifest.raw_bytes} bytes)",
                generation,
            )
        ],
    }


def build_failed_status(shard: str, message: str, generation: int) -> dict[str, Any]:
    return {
        "phase": FAILED,
        "shard": shard,
        "message": truncate_message(message),
        "conditions": [_condition(False, CAPTURE_FAILED, message, generation)],
    }


def needs_capture(snapshot: Mapping[str, Any]) -> bool:
    """Not being deleted and never finished (Ready/Failed are final: a re-list captures nothing)."""
    return not is_deleting(snapshot) and phase_of(snapshot) not in (READY, FAILED)


def pick_restore(
    tenant: Mapping[str, Any], snapshots: Sequence[Mapping[str, Any]]
) -> tuple[Mapping[str, Any] | None, str]:
    """The Snapshot a starting Tenant restores: spec.restoreFrom if Ready, else its newest Ready one."""
    name = str((tenant.get("metadata") or {}).get("name") or "")
    return restore_choice(name, (tenant.get("spec") or {}).get("restoreFrom"), snapshots)


def blob_deleter(snapshot: Mapping[str, Any], live: Collection[str]) -> str | None:
    """The one shard that removes a deleted Snapshot's blob and finalizer.

    The shard that captured it (status.shard) when live, else the lowest-ordinal live shard; None:
    no live shard (nobody acts). Decided from the Snapshot alone: a shard watches only its own
    Tenants, so every shard must reach the same answer without seeing where the tenant is.
    """
    owner = (snapshot.get("status") or {}).get("shard")
    if owner and owner in live:
        return str(owner)
    return min(live, key=shard_sort_key) if live else None


# --- I/O -----------------------------------------------------------------------------------------


class SnapshotAgent:
    """Runs captures, blob deletions and restores for the Snapshots of tenants served on one shard."""

    def __init__(
        self,
        api: Patcher,
        store: SnapshotStore,
        shard_name: str,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.api, self.store, self.shard_name, self.accelerator = api, store, shard_name, accelerator

    async def reconcile(self, snapshot: Mapping[str, Any], tenant: TenantHandle | None) -> str:
        """Act on one Snapshot; returns what it did ("captured", "failed", "deleted", "none")."""
        meta = snapshot.get("metadata") or {}
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        finalizers = list(meta.get("finalizers") or [])
        if meta.get("deletionTimestamp"):
            # The caller passes a deleted Snapshot only when blob_deleter named this shard.
            if FINALIZER not in finalizers:
                return "none"
            digest = (snapshot.get("status") or {}).get("checksum")
            uid = (snapshot.get("status") or {}).get("tenantUid") or (tenant.uid if tenant else "")
            if digest and uid:
                self.store.delete(uid, digest)
            await self._patch(ns, name, {"metadata": {"finalizers": [f for f in finalizers if f != FINALIZER],
                                                "resourceVersion": meta.get("resourceVersion")}})  # fmt: skip
            log.info("Deleted Snapshot blob name=%s digest=%s", name, digest)
            return "deleted"
        if tenant is None or not needs_capture(snapshot):
            return "none"
        generation = int(meta.get("generation") or 0)
        if FINALIZER not in finalizers:
            await self._patch(ns, name, {"metadata": {"finalizers": [*finalizers, FINALIZER]}})
        await self._status(ns, name, build_capturing_status(self.shard_name, generation))
        try:
            result = await asyncio.to_thread(
                capture_snapshot,
                self.store, tenant_uid=tenant.uid, module_sha256=tenant.module_sha256,
                generation=tenant.generation, pool=tenant.pool, device=tenant.device,
                accelerator=self.accelerator, tenant=tenant.name,
            )  # fmt: skip
        except (RuntimeFault, OSError) as exc:
            message = exc.message if isinstance(exc, RuntimeFault) else f"{type(exc).__name__}: {exc}"
            await self._status(ns, name, build_failed_status(self.shard_name, message, generation))
            log.warning("Failed capturing Snapshot name=%s tenant=%s message=%s", name, tenant.name, message)
            return "failed"
        status = build_ready_status(result, self.shard_name, generation)
        status["tenantUid"] = tenant.uid
        await self._status(ns, name, status)
        log.info("Captured Snapshot name=%s tenant=%s bytes=%d", name, tenant.name, result.manifest.raw_bytes)
        return "captured"

    def restore_on_start(
        self, tenant: TenantHandle, tenant_obj: Mapping[str, Any], snapshots: Sequence[Mapping[str, Any]]
    ) -> tuple[RestoreResult | None, str]:
        """Restore the chosen Snapshot when its blob is in this shard's store; (None, why) otherwise."""
        chosen, why = pick_restore(tenant_obj, snapshots)
        if chosen is None:
            return None, why
        digest = (chosen.get("status") or {}).get("checksum", "")
        try:
            path = self.store.path_of(tenant.uid, digest)
            result = restore_snapshot(
                path, tenant_uid=tenant.uid, module_sha256=tenant.module_sha256, pool=tenant.pool,
                device=tenant.device, accelerator=self.accelerator,
            )  # fmt: skip
        except (NotFound, SnapshotRejected) as exc:
            log.warning("Skipped restoring Tenant name=%s snapshot=%s message=%s", tenant.name,
                        chosen["metadata"]["name"], exc.message)  # fmt: skip
            return None, exc.message
        log.info("Restored Tenant name=%s snapshot=%s", tenant.name, chosen["metadata"]["name"])
        return result, f"restored from Snapshot {chosen['metadata']['name']}"

    async def _patch(self, ns: str, name: str, body: dict[str, Any]) -> None:
        await self.api.merge_patch(
            resource_path(API_VERSION, SNAPSHOT.plural, ns, name), body, want_body=False
        )

    async def _status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        path = resource_path(API_VERSION, SNAPSHOT.plural, ns, name, "status")
        await self.api.merge_patch(path, {"status": status}, want_body=False)
