"""`tensorwasm tenant check FILE...`: validate Tenant manifests offline, exactly as the cluster would.

Owns the command only: the verdict is tensorwasm.api.tenant's (the model the CRD is generated
from, which the operator and the shards use too) and the reservation is the planner's admission.
Exit codes: 0 = every Tenant valid, 1 = at least one invalid, 2 = a file cannot be read.
Must not import kopf, the runtime or anything doing network I/O.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("tenant", help="check Tenant manifests offline")
    actions = parser.add_subparsers(dest="tenant_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check", help="validate Tenant manifests and print what each reserves on a shard"
    )
    check.add_argument("files", type=Path, nargs="+", help="YAML files (several documents each are fine)")
    check.set_defaults(handler=check_command)


def check_command(args: argparse.Namespace) -> int:
    import yaml

    from tensorwasm.api.fields import InvalidSpec
    from tensorwasm.api.group import API_VERSION, TENANT
    from tensorwasm.api.tenant import tenant_name_problem
    from tensorwasm.planner.admission import admit_spec
    from tensorwasm.planner.units import format_bytes

    invalid = 0
    for path in args.files:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
        except (OSError, yaml.YAMLError) as exc:
            print(f"error: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        for doc in docs:
            if doc.get("apiVersion") != API_VERSION or doc.get("kind") != TENANT.kind:
                continue
            name = str((doc.get("metadata") or {}).get("name", ""))
            try:
                problem = tenant_name_problem(name)
                if problem:
                    raise InvalidSpec(f"metadata.name: {problem}")
                demand = admit_spec(doc.get("spec"))
            except InvalidSpec as exc:
                invalid += 1
                print(f"{path}: tenant/{name}: invalid: {exc}")
                continue
            gpu = (
                format_bytes(demand.gpu_memory_bytes) if demand.gpu_memory_bytes else "none (accounting only)"
            )
            print(
                f"{path}: tenant/{name}: valid; reserves gpuMemory {gpu}, smPercent {demand.sm_percent}%, "
                f"hostMemory {format_bytes(demand.host_memory_bytes)}"
            )
    return 1 if invalid else 0
