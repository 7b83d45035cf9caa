"""Watches of the per-tenant Services and Secrets the operator owns, to keep its view current.

Async handlers: kopf runs a sync handler in a thread pool, a thread hop per event.

Must not write anything; the Reconciler repairs what was deleted under it.
"""

from __future__ import annotations

from typing import Any

import kopf

from tensorwasm.api.group import LABEL_TENANT
from tensorwasm.operator.desired.meta import MANAGED_SELECTOR
from tensorwasm.operator.reconciler import Reconciler
from tensorwasm.operator.settings import OperatorSettings


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    labels: dict[str, Any] = {**MANAGED_SELECTOR, LABEL_TENANT: kopf.PRESENT}

    @kopf.on.event("", "v1", "services", labels=labels, registry=registry, id="tenant-service-watch")
    async def tenant_service_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        reconciler: Reconciler = memo["reconciler"]
        reconciler.observe_owned("Service", event.get("type"), event["object"])

    @kopf.on.event("", "v1", "secrets", labels=labels, registry=registry, id="tenant-secret-watch")
    async def tenant_secret_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        reconciler: Reconciler = memo["reconciler"]
        reconciler.observe_owned("Secret", event.get("type"), event["object"])
