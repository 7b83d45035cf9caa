"""Typed views of the operator's resources, parsed once at the edge.

Owns Tenant spec/status parsing. Must not import kopf, kube/ or anything doing I/O.
"""

from tensorwasm.operator.models.tenant import (
    InvalidSpec,
    Limits,
    ModuleSource,
    RuntimeReport,
    Tenant,
    TenantSpec,
    parse_tenant,
)

__all__ = [
    "InvalidSpec",
    "Limits",
    "ModuleSource",
    "RuntimeReport",
    "Tenant",
    "TenantSpec",
    "parse_tenant",
]
