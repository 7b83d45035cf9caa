"""Thin kopf handlers: they adapt watch events to the Reconciler and carry explicit, stable ids.

Owns the kopf registry of the operator. Nothing here decides or builds anything.
"""

from __future__ import annotations

import kopf

from tensorwasm.operator.handlers import lifecycle, owned, shards, snapshots, tenant
from tensorwasm.operator.settings import OperatorSettings


def build_registry(settings: OperatorSettings) -> kopf.OperatorRegistry:
    """A fresh registry with every handler of the operator (no module-level decorators)."""
    registry = kopf.OperatorRegistry()
    for module in (lifecycle, tenant, shards, owned, snapshots):
        module.register(registry, settings)
    return registry
