"""Snapshot watch: keeps the operator's Snapshot cache current and wakes the Snapshot's Tenant.

Must not decide anything itself; the Reconciler does (moves, retention, lastSnapshot, orphans).
"""

from __future__ import annotations

from typing import Any

import kopf

from tensorwasm.api.group import GROUP, SNAPSHOT, VERSION
from tensorwasm.operator.reconciler import Reconciler
from tensorwasm.operator.settings import OperatorSettings


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    @kopf.on.event(GROUP, VERSION, SNAPSHOT.plural, registry=registry, id="snapshot-watch")
    async def snapshot_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        reconciler: Reconciler = memo["reconciler"]
        await reconciler.on_snapshot(event.get("type"), event["object"])
