"""Names derived from a Tenant or a shard: the token Secret, the per-tenant Service, pod ordinals.

Both the operator (which creates the objects) and the runtime (which reads them) derive the names
here, so they cannot drift. Pure; must not import anything of tensorwasm outside tensorwasm.api.
"""

from __future__ import annotations

import re

# A Tenant's name is a DNS label short enough that "tw-<name>" (its Service) is one too.
TENANT_NAME_MAX = 60
TENANT_NAME_PATTERN = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_TENANT_NAME = re.compile(TENANT_NAME_PATTERN)


def is_tenant_name(name: str) -> bool:
    return len(name) <= TENANT_NAME_MAX and _TENANT_NAME.match(name) is not None


def tenant_service_name(tenant: str) -> str:
    return f"tw-{tenant}"


def token_secret_name(tenant: str, auth_secret_name: str | None = None) -> str:
    """spec.authSecretRef.name when set, else the Secret the operator creates for the tenant."""
    return auth_secret_name or f"tw-{tenant}-token"


def shard_pod_name(shard_name: str, ordinal: int) -> str:
    return f"{shard_name}-{ordinal}"


def shard_ordinal(shard_name: str, pod_name: str | None) -> int | None:
    """The ordinal in `<shard_name>-<n>`, or None for anything else."""
    prefix = f"{shard_name}-"
    if pod_name is None or not pod_name.startswith(prefix) or not pod_name[len(prefix) :].isdigit():
        return None
    return int(pod_name[len(prefix) :])


def shard_sort_key(pod_name: str) -> tuple[int, str]:
    """Orders shard pods of any StatefulSet by ordinal; names without one sort last."""
    prefix, _, ordinal = pod_name.rpartition("-")
    return (int(ordinal), prefix) if prefix and ordinal.isdigit() else (1 << 62, pod_name)
