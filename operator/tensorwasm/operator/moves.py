"""Moving a tenant between two running shards, through a Snapshot captured on the source.

Owns the `MoveStrategy` protocol the reconciler asks before it re-points a tenant (status.shard
and its Service) from a running source shard to a target shard, and its two strategies:
- `DirectMove`: at once (the target cold-starts the tenant, restoring its newest Ready Snapshot);
- `SnapshotMove` (the operator's): with snapshot policy OnMove, create `<tenant>-move-<short>`
  (the source shard, which still serves the tenant, captures it), answer "not yet" until it is
  Ready or Failed or `timeout_s` passed, then "move": the target shard restores the newest Ready
  Snapshot when it starts the tenant. The move in flight is kept in the Tenant's `status.move`
  so a restarted operator waits for the same Snapshot. Manual and Periodic policies move at once.
A source shard that is gone never reaches this seam: the reconciler moves those tenants at once.
Must not import kopf; I/O only through the KubeApi it is given, never sleeps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tensorwasm.api.group import API_VERSION, SNAPSHOT
from tensorwasm.api.snapshot import FAILED, READY, phase_of
from tensorwasm.api.stamps import parse_rfc3339
from tensorwasm.api.tenant import Tenant
from tensorwasm.kube.client import KubeApi, resource_path
from tensorwasm.operator.snapshots import MOVE, build_snapshot, short_id, snapshot_name

log = logging.getLogger("tensorwasm.operator")

ON_MOVE = "OnMove"


@dataclass(frozen=True)
class MoveStep:
    """`ready`: re-point the tenant now. Otherwise `record` is status.move to keep while waiting."""

    ready: bool
    record: Mapping[str, Any] | None = None


class MoveStrategy(Protocol):
    async def ready_to_move(self, tenant: Tenant, source: str, target: str) -> MoveStep:
        """MoveStep(True) when the tenant may be re-pointed now; else ask again later."""
        ...


class DirectMove:
    """Move immediately; the target shard cold-starts the tenant."""

    async def ready_to_move(self, tenant: Tenant, source: str, target: str) -> MoveStep:
        return MoveStep(True)


class SnapshotMove:
    """Capture on the source first (policy OnMove); `snapshots` is the operator's live cache."""

    def __init__(
        self,
        api: KubeApi,
        snapshots: Mapping[str, Mapping[str, Any]],
        clock: Callable[[], str],
        timeout_s: float,
    ) -> None:
        self.api, self.snapshots, self.clock, self.timeout_s = api, snapshots, clock, timeout_s
        self._created: set[str] = set()  # created by this process, maybe not yet in the cache

    async def ready_to_move(self, tenant: Tenant, source: str, target: str) -> MoveStep:
        if tenant.spec is None or tenant.spec.snapshot.policy != ON_MOVE:
            return MoveStep(True)
        now = self.clock()
        move = tenant.status.get("move")
        if isinstance(move, Mapping) and move.get("target") == target and move.get("snapshot"):
            name = str(move["snapshot"])
            snapshot = self.snapshots.get(name)
            if snapshot is not None and phase_of(snapshot) in (READY, FAILED):
                if phase_of(snapshot) == FAILED:
                    log.warning("Moving Tenant %s without its move Snapshot %s (Failed)", tenant.name, name)
                return MoveStep(True)
            waited = (parse_rfc3339(now) - parse_rfc3339(str(move.get("startedAt") or now))).total_seconds()
            if waited >= self.timeout_s:
                log.warning("Moving Tenant %s: Snapshot %s not Ready after %.0fs", tenant.name, name, waited)
                return MoveStep(True)
            if snapshot is None and name not in self._created:  # lost (deleted, or a restart): again
                await self._create(tenant, name)
            return MoveStep(False, dict(move))
        name = snapshot_name(tenant.name, MOVE, short_id(tenant.uid, source, target, now))
        await self._create(tenant, name)
        log.info("Moving Tenant %s from=%s to=%s after Snapshot %s", tenant.name, source, target, name)
        return MoveStep(False, {"target": target, "snapshot": name, "startedAt": now})

    async def _create(self, tenant: Tenant, name: str) -> None:
        path = resource_path(API_VERSION, SNAPSHOT.plural, tenant.namespace)
        await self.api.create(path, build_snapshot(tenant, name, MOVE))  # 409 (exists) is fine
        self._created.add(name)
