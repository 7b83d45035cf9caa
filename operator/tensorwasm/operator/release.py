"""`tensorwasm operator --release-finalizers`: free Tenants and Snapshots stuck Terminating.

Owns the recovery after an uninstall in the wrong order (helm uninstall before the Tenants were
deleted): it removes this project's finalizers (the operator's on Tenants, the shards' blob
finalizer on Snapshots) from every object of the namespace that has them, each a compare-and-swap
on resourceVersion, so deletions waiting on them complete. A Snapshot freed this way leaves its
blob on the snapshot volume (no shard is there to delete it). Must not import kopf.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tensorwasm.api.group import API_VERSION, FINALIZER, SNAPSHOT, SNAPSHOT_BLOB_FINALIZER, TENANT
from tensorwasm.kube.client import KubeApi, KubeError, resource_path
from tensorwasm.operator.preflight import connection
from tensorwasm.operator.settings import FIELD_MANAGER

log = logging.getLogger("tensorwasm.operator")
OURS = (FINALIZER, SNAPSHOT_BLOB_FINALIZER)


async def release_finalizers(namespace: str, only_deleting: bool = True) -> list[str]:
    """Remove our finalizers in `namespace`; returns "<kind>/<name>" of each object freed.

    `only_deleting`: only objects already being deleted (the stuck ones); False also frees live ones.
    """
    api = KubeApi(connection(), FIELD_MANAGER)
    freed: list[str] = []
    try:
        for kind in (TENANT, SNAPSHOT):
            for body in await api.list(resource_path(API_VERSION, kind.plural, namespace)):
                meta = body["metadata"]
                finalizers: Sequence[str] = meta.get("finalizers") or []
                if not set(finalizers) & set(OURS) or (only_deleting and not meta.get("deletionTimestamp")):
                    continue
                keep = [f for f in finalizers if f not in OURS]
                patch = {"metadata": {"finalizers": keep, "resourceVersion": meta["resourceVersion"]}}
                try:
                    await api.merge_patch(
                        resource_path(API_VERSION, kind.plural, namespace, meta["name"]), patch
                    )
                except KubeError as exc:
                    if exc.status not in (404, 409):  # gone, or changed: it is someone else's now
                        raise
                    continue
                freed.append(f"{kind.singular}/{meta['name']}")
    finally:
        await api.close()
    return freed
