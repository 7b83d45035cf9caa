"""Names, labels and owner references shared by the builders.

Pure; must not import kopf or kube/.
"""

from __future__ import annotations

from typing import Any

from tensorwasm.operator.models import Tenant

MANAGED_BY = "tensorwasm-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_TENANT = "tensorwasm.io/tenant"
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
TENANT_API_VERSION = "tensorwasm.io/v1alpha1"

MANAGED_SELECTOR = {LABEL_MANAGED_BY: MANAGED_BY}


def shard_labels(shard_name: str) -> dict[str, str]:
    return {LABEL_NAME: shard_name, LABEL_COMPONENT: "runtime-shard", LABEL_MANAGED_BY: MANAGED_BY}


def tenant_labels(tenant: str) -> dict[str, str]:
    return {LABEL_NAME: "tensorwasm-tenant", LABEL_TENANT: tenant, LABEL_MANAGED_BY: MANAGED_BY}


def shard_pod_name(shard_name: str, ordinal: int) -> str:
    return f"{shard_name}-{ordinal}"


def shard_ordinal(shard_name: str, pod_name: str | None) -> int | None:
    """The ordinal in `<shard_name>-<n>`, or None for anything else."""
    prefix = f"{shard_name}-"
    if pod_name is None or not pod_name.startswith(prefix) or not pod_name[len(prefix) :].isdigit():
        return None
    return int(pod_name[len(prefix) :])


def tenant_service_name(tenant: str) -> str:
    return f"tw-{tenant}"


def default_token_secret_name(tenant: str) -> str:
    return f"tw-{tenant}-token"


def token_secret_name(tenant: Tenant) -> str:
    if tenant.spec is not None and tenant.spec.auth_secret_name:
        return tenant.spec.auth_secret_name
    return default_token_secret_name(tenant.name)


def tenant_owner_reference(tenant: Tenant) -> dict[str, Any]:
    """Controller reference: the garbage collector deletes the object with its Tenant."""
    return {
        "apiVersion": TENANT_API_VERSION,
        "kind": "Tenant",
        "name": tenant.name,
        "uid": tenant.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
