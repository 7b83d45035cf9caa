"""Shard StatefulSet watch: a change of replicas (kubectl scale, an HPA) resizes the shard set.

Must not decide anything itself; the Reconciler does.
"""

from __future__ import annotations

from typing import Any

import kopf

from tensorwasm.operator.desired.meta import shard_labels
from tensorwasm.operator.reconciler import Reconciler
from tensorwasm.operator.settings import OperatorSettings


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    labels: dict[str, Any] = dict(shard_labels(settings.shard_name))

    @kopf.on.event("apps", "v1", "statefulsets", labels=labels, registry=registry, id="shard-statefulset")
    async def shard_statefulset_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        reconciler: Reconciler = memo["reconciler"]
        await reconciler.on_statefulset(event.get("type"), event["object"])
