"""`tensorwasm dev autoscaler keda|custom-metrics up|down`: the chart's two autoscaler paths on the dev
cluster's real node (docs/helm.md, Autoscaling): KEDA built from its Go module, or the HPA path's
custom metrics API reading the dev Prometheus.

Must not import kopf or the runtime; the work is in tensorwasm.dev.autoscalers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(dev_sub: Any) -> None:
    scaler = dev_sub.add_parser(
        "autoscaler",
        help="KEDA (external.metrics.k8s.io) or the HPA path's custom.metrics.k8s.io on the real node",
    )
    scaler.add_argument("path", choices=("keda", "custom-metrics"))
    scaler.add_argument("action", choices=("up", "down"))
    scaler.add_argument(
        "--dir", type=Path, default=None, help="cluster state directory (default: the dev cluster)"
    )
    scaler.add_argument(
        "--prometheus", default=None, help="custom-metrics: Prometheus URL (default: the dev Prometheus')"
    )
    scaler.add_argument(
        "--image", default=None, help="custom-metrics: image with python3 (default: the chart's dev image)"
    )
    scaler.set_defaults(handler=run_autoscaler)


def run_autoscaler(args: argparse.Namespace) -> int:
    from tensorwasm.cli.dev import dev_tools_missing, log, recorded_cluster

    if dev_tools_missing():
        return 2
    from tensorwasm.dev import autoscalers, prometheus
    from tensorwasm.dev.cluster import ClusterError

    try:
        plane, state = recorded_cluster(args.dir)
        dev = autoscalers.DevAutoscalers(plane, state, log=log)
        if args.path == "keda":
            if args.action == "up":
                dev.keda_up()
            else:
                dev.keda_down()
            return 0
        if args.action == "down":
            dev.custom_metrics_down()
            return 0
        image = args.image or prometheus.DEFAULT_DISCOVERY_IMAGE
        url = (
            args.prometheus
            or prometheus.DevPrometheus(
                plane, state, "tensorwasm-monitoring", ["tensorwasm"], image, log=log
            ).url()
        )
        dev.custom_metrics_up(url, image)
        return 0
    except ClusterError as exc:
        log(f"error: {exc}")
        return 1
