"""The seam where moving a tenant between shards will go through snapshot capture and restore.

Owns the `MoveStrategy` protocol the reconciler asks before it re-points a tenant (status.shard
and its Service) from a source shard to a target shard. Today's `DirectMove` moves at once: the
target shard cold-starts the tenant from its module (and the latest Ready Snapshot, if the shard
restores one). The snapshot issue replaces it with a strategy that creates a Snapshot on the
source shard, answers False until that Snapshot is Ready, then points the tenant's
`restoreFrom` at it. Must not import kopf; I/O only through the KubeApi it is given.
"""

from __future__ import annotations

from typing import Protocol

from tensorwasm.operator.models import Tenant


class MoveStrategy(Protocol):
    async def ready_to_move(self, tenant: Tenant, source: str, target: str) -> bool:
        """True when the tenant may be re-pointed now; False means "ask again later"."""
        ...


class DirectMove:
    """Move immediately; the target shard cold-starts the tenant."""

    async def ready_to_move(self, tenant: Tenant, source: str, target: str) -> bool:
        return True
