"""The two CustomResourceDefinitions, generated from the spec models (crds/ is this module's output).

Owns the CRD documents: names, printer columns, selectable fields, the status schemas (written by
the operator and the shards, not by users) and the spec schemas `openapi_schema` derives from
`TenantSpec` and `SnapshotSpec`. `python -m tensorwasm.api.crd DIR` (`make crds`) writes them;
a unit test proves crds/ is current. Pure apart from that command; imports only tensorwasm.api
(and PyYAML to write files).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tensorwasm.api.fields import openapi_schema
from tensorwasm.api.group import GROUP, SNAPSHOT, TENANT, VERSION, Kind
from tensorwasm.api.snapshot import PHASES as SNAPSHOT_PHASES
from tensorwasm.api.snapshot import SnapshotSpec
from tensorwasm.api.tenant import NAME_RULE, TenantSpec

TENANT_PHASES = ("Pending", "Placed", "Ready", "Asleep", "Degraded", "Failed")
JSON = dict[str, Any]

_INT64 = {"type": "integer", "format": "int64"}
_STAMP = {"type": "string", "format": "date-time"}
_CONDITIONS: JSON = {
    "type": "array",
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
    "items": {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "observedGeneration": _INT64,
            "lastTransitionTime": _STAMP,
        },
    },
}


def _described(schema: JSON, text: str) -> JSON:
    return {**schema, "description": text}


TENANT_STATUS: JSON = {
    "type": "object",
    "description": "Written by the operator, except runtime which the serving shard writes.",
    "x-kubernetes-preserve-unknown-fields": True,
    "properties": {
        "phase": {"type": "string", "enum": list(TENANT_PHASES)},
        "shard": {"type": "string", "description": "Name of the shard pod serving the tenant."},
        "endpoint": {"type": "string", "description": "In-cluster URL of the tenant's Service."},
        "tokenSecretName": {
            "type": "string",
            "description": 'Secret holding the tenant\'s bearer token (key "token").',
        },
        "gpuBytesInUse": _INT64,
        "gpuInUse": {
            "type": "string",
            "description": "gpuBytesInUse for people (e.g. 12Mi), for kubectl get.",
        },
        "observedGeneration": _INT64,
        "lastSnapshot": {
            "type": "object",
            "description": "The newest Ready Snapshot of this tenant.",
            "properties": {
                "name": {"type": "string", "description": "Snapshot name."},
                "time": _described(_STAMP, "When it became Ready."),
            },
        },
        "move": {
            "type": "object",
            "description": "The move to another shard in flight (absent when none); docs/operator.md, Moves.",
            "properties": {
                "source": {"type": "string", "description": "Shard pod the tenant moves from."},
                "target": {"type": "string", "description": "Shard pod the tenant moves to."},
                "phase": {
                    "type": "string",
                    "enum": ["Holding", "Restoring"],
                    "description": "Holding: the source holds the tenant and captures `snapshot`; "
                    "Restoring: the target loads it while its Service still selects the source.",
                },
                "snapshot": {"type": "string", "description": "Snapshot captured on the source shard first."},
                "startedAt": _STAMP,
            },
        },
        "pendingMove": {
            "type": "object",
            "description": "Placed on another shard whose pod is not Ready yet: the move begins once it "
            "is; the current shard serves meanwhile (absent when none).",
            "properties": {"target": {"type": "string", "description": "Shard pod the tenant will move to."}},
        },
        "conditions": _CONDITIONS,
        "runtime": {
            "type": "object",
            "description": "The serving shard's report.",
            "x-kubernetes-preserve-unknown-fields": True,
            "properties": {
                "shard": {"type": "string"},
                "observedGeneration": _INT64,
                "loaded": {"type": "boolean"},
                "reason": {"type": "string"},
                "message": {"type": "string"},
                "gpuBytesInUse": _INT64,
                "reportedAt": _STAMP,
            },
        },
    },
}

SNAPSHOT_STATUS: JSON = {
    "type": "object",
    "x-kubernetes-preserve-unknown-fields": True,
    "properties": {
        "phase": {"type": "string", "enum": list(SNAPSHOT_PHASES)},
        "shard": {"type": "string", "description": "Shard that captured it."},
        "sizeBytes": _INT64,
        "storedBytes": _INT64,
        "size": {"type": "string", "description": "sizeBytes for people (e.g. 512Mi), for kubectl get."},
        "stored": {"type": "string", "description": "storedBytes for people, for kubectl get."},
        "checksum": {"type": "string", "description": "Content digest of the blob."},
        "location": {"type": "string", "description": "Where the blob is stored."},
        "message": {"type": "string"},
        "reason": {"type": "string", "description": "Why it failed, e.g. TenantNotFound or CaptureFailed."},
        "tenantUid": {"type": "string", "description": "UID of the Tenant the blob belongs to."},
        "durations": {
            "type": "object",
            "description": "Seconds per phase (quiesce, capture, compress, write, ...).",
            "additionalProperties": {"type": "number"},
        },
        "conditions": _CONDITIONS,
    },
}

TENANT_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase",
     "description": "Pending, Placed, Ready, Asleep (wakes on the first request), Degraded or Failed."},
    {"name": "Shard", "type": "string", "jsonPath": ".status.shard",
     "description": "The runtime shard (pod) serving the tenant."},
    {"name": "GPU-Cap", "type": "string", "jsonPath": ".spec.limits.gpuMemory",
     "description": "GPU memory cap; empty means accounting only."},
    {"name": "GPU-Used", "type": "string", "jsonPath": ".status.gpuInUse",
     "description": "GPU memory in use as reported by the shard (status.gpuBytesInUse in bytes)."},
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    # kubectl get -o wide
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1,
     "description": "In-cluster URL of the tenant's Service."},
    {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
     "priority": 1, "description": "Why the tenant is (not) Ready."},
    {"name": "Message", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].message',
     "priority": 1, "description": "The Ready condition's message."},
]  # fmt: skip

SNAPSHOT_COLUMNS = [
    {"name": "Tenant", "type": "string", "jsonPath": ".spec.tenant"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Size", "type": "string", "jsonPath": ".status.size",
     "description": "Uncompressed bytes captured (status.sizeBytes in bytes)."},
    {"name": "Stored", "type": "string", "jsonPath": ".status.stored",
     "description": "Bytes on disk after compression (status.storedBytes in bytes)."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]  # fmt: skip


def _crd(kind: Kind, description: str, spec: JSON, status: JSON, version_extra: JSON) -> JSON:
    root: JSON = {"type": "object", "description": description}
    if kind is TENANT:
        # fieldPath: the error names metadata.name, not "<nil>".
        root["x-kubernetes-validations"] = [
            {"rule": NAME_RULE.cel, "message": NAME_RULE.message, "fieldPath": ".metadata.name"}
        ]
    root["properties"] = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        # metadata.name declared (the one field a CRD may constrain) so the name rule's fieldPath is valid.
        "metadata": {"type": "object", "properties": {"name": {"type": "string"}}}
        if kind is TENANT
        else {"type": "object"},
        "spec": spec,
        "status": status,
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": [kind.short_name],
                "categories": ["tensorwasm"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    **version_extra,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def build_tenant_crd() -> JSON:
    spec = openapi_schema(TenantSpec, "What the tenant runs and within which limits.")
    return _crd(
        TENANT,
        "A Tenant runs one WebAssembly module's exported functions on a shared GPU runtime shard, "
        "with its own GPU memory cap, limits and bearer token.",
        spec,
        TENANT_STATUS,
        # Each runtime shard lists and watches only its own Tenants (fieldSelector status.shard=<pod>).
        {"selectableFields": [{"jsonPath": ".status.shard"}], "additionalPrinterColumns": TENANT_COLUMNS},
    )


def build_snapshot_crd() -> JSON:
    spec = openapi_schema(SnapshotSpec, "Which Tenant to capture.")
    return _crd(
        SNAPSHOT,
        "A point-in-time capture of one Tenant's state, used for fast cold starts and moves.",
        spec,
        SNAPSHOT_STATUS,
        {"additionalPrinterColumns": SNAPSHOT_COLUMNS},
    )


HEADERS = {
    TENANT: "# Tenant: one customer's WebAssembly functions, their limits and GPU share.\n"
    "# The operator writes status, except status.runtime, which the serving shard writes.\n",
    SNAPSHOT: "# Snapshot: a captured state of one Tenant (wasm memory + globals + GPU buffers).\n"
    "# The shard serving the tenant captures it and writes status.\n",
}
GENERATED = "# Generated by `make crds` from tensorwasm.api (api/tensorwasm/api/); do not edit.\n"


def render_crds() -> dict[str, str]:
    """File name -> YAML text of each CRD, as crds/ holds them."""
    import yaml

    out = {}
    for kind, crd in ((TENANT, build_tenant_crd()), (SNAPSHOT, build_snapshot_crd())):
        text = yaml.safe_dump(crd, sort_keys=False, width=1 << 16, allow_unicode=True)
        out[f"{GROUP}_{kind.plural}.yaml"] = HEADERS[kind] + GENERATED + text
    return out


def main(argv: list[str]) -> int:
    target = Path(argv[0]) if argv else Path("crds")
    for name, text in render_crds().items():
        (target / name).write_text(text)
        print(f"wrote {target / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
