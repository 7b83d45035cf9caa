"""Tenant watch handler: every event (including the initial listing) triggers a reconcile.

Must not decide anything itself; the Reconciler does.
"""

from __future__ import annotations

from typing import Any

import kopf

from tensorwasm.api.group import GROUP, TENANT, VERSION
from tensorwasm.operator.reconciler import Reconciler
from tensorwasm.operator.settings import OperatorSettings


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    @kopf.on.event(GROUP, VERSION, TENANT.plural, registry=registry, id="tenant-reconcile")
    async def tenant_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        reconciler: Reconciler = memo["reconciler"]
        await reconciler.on_tenant(event.get("type"), event["object"])
