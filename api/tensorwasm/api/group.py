"""The API group, its version, the two kinds and the labels and finalizers named after the group.

Pure constants; must not import anything of tensorwasm.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "tensorwasm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclass(frozen=True)
class Kind:
    """One kind's names as the CRD declares them."""

    kind: str
    plural: str
    short_name: str

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


TENANT = Kind("Tenant", "tenants", "twt")
SNAPSHOT = Kind("Snapshot", "snapshots", "tws")

# The operator's finalizer on every Tenant; a shard's on every Snapshot whose blob it must delete.
FINALIZER = f"{GROUP}/finalizer"
SNAPSHOT_BLOB_FINALIZER = f"{GROUP}/snapshot-blob"
LABEL_TENANT = f"{GROUP}/tenant"
LABEL_PURPOSE = f"{GROUP}/purpose"
