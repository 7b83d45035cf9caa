"""Labels and owner references shared by the builders (object names derive in tensorwasm.api.names).

Pure; must not import kopf or kube/.
"""

from __future__ import annotations

from typing import Any

from tensorwasm.api.group import API_VERSION, LABEL_TENANT, TENANT
from tensorwasm.api.tenant import Tenant

MANAGED_BY = "tensorwasm-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"

MANAGED_SELECTOR = {LABEL_MANAGED_BY: MANAGED_BY}


def shard_labels(shard_name: str) -> dict[str, str]:
    return {LABEL_NAME: shard_name, LABEL_COMPONENT: "runtime-shard", LABEL_MANAGED_BY: MANAGED_BY}


def tenant_labels(tenant: str) -> dict[str, str]:
    return {LABEL_NAME: "tensorwasm-tenant", LABEL_TENANT: tenant, LABEL_MANAGED_BY: MANAGED_BY}


def tenant_owner_reference(tenant: Tenant) -> dict[str, Any]:
    """Controller reference: the garbage collector deletes the object with its Tenant."""
    return {
        "apiVersion": API_VERSION,
        "kind": TENANT.kind,
        "name": tenant.name,
        "uid": tenant.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
