"""`tensorwasm operator`: run the Kubernetes operator (kopf) for one namespace.

Flags override the matching TENSORWASM_OPERATOR_* variables. Imports kopf lazily.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "operator",
        help="run the operator: places Tenants on runtime shards and keeps their status",
        description="Run the TensorWasm operator. Every setting is also a TENSORWASM_OPERATOR_* variable.",
    )
    parser.add_argument("--namespace", help="namespace to manage (TENSORWASM_OPERATOR_NAMESPACE)")
    parser.add_argument("--shards", type=int, help="initial shard count (TENSORWASM_OPERATOR_SHARDS)")
    parser.add_argument("--kubeconfig", help="kubeconfig path (else in-cluster, $KUBECONFIG, ~/.kube/config)")
    parser.add_argument(
        "--peering",
        metavar="NAME",
        help="coordinate with other operator replicas through kopf peering NAME (default: standalone)",
    )
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines as text or JSON (TENSORWASM_OPERATOR_LOG_FORMAT)",
    )
    parser.add_argument(
        "--release-finalizers",
        action="store_true",
        help="recovery after uninstalling in the wrong order: free the namespace's Tenants and Snapshots"
        " left Terminating (removes tensorwasm.io finalizers), then exit",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from tensorwasm.operator.settings import PREFIX, SettingsError, load_settings

    env = dict(os.environ)
    overrides = {
        "NAMESPACE": args.namespace,
        "SHARDS": None if args.shards is None else str(args.shards),
        "LOG_LEVEL": args.log_level,
        "LOG_FORMAT": args.log_format,
        "PEERING_NAME": args.peering,
        "STANDALONE": None if args.peering is None else "false",
    }
    env.update({PREFIX + k: v for k, v in overrides.items() if v is not None})
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # kopf's login reads it from the environment
    try:
        settings = load_settings(env)
    except SettingsError as exc:
        print(f"tensorwasm operator: {exc}", file=sys.stderr)
        return 2
    import asyncio

    from tensorwasm.operator.preflight import StartupError, preflight

    if args.release_finalizers:
        return _release(settings.namespace)

    try:
        asyncio.run(preflight([settings.namespace], settings.startup_timeout_s))
    except StartupError as exc:
        print(f"tensorwasm operator: {exc}", file=sys.stderr)  # one line, no traceback
        return 1
    from tensorwasm.operator.main import run

    run(settings)
    return 0


def _release(namespace: str) -> int:
    import asyncio

    from tensorwasm.kube.client import KubeError
    from tensorwasm.operator.preflight import StartupError
    from tensorwasm.operator.release import release_finalizers

    try:
        freed = asyncio.run(release_finalizers(namespace))
    except (StartupError, KubeError, OSError) as exc:
        print(f"tensorwasm operator: {exc}", file=sys.stderr)
        return 1
    for name in freed:
        print(f"released {name} in {namespace}")
    print(f"{len(freed)} object(s) released in namespace {namespace}")
    return 0
