"""`tensorwasm dev prometheus up|down|url|query`: a real Prometheus on the dev cluster's real node that
scrapes the shard pods as the chart's ServiceMonitor intends (docs/helm.md, Monitoring).

Must not import kopf or the runtime; the work is in tensorwasm.dev.prometheus.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(dev_sub: Any) -> None:
    prom = dev_sub.add_parser(
        "prometheus", help="a Prometheus pod on the real node scraping the shards' /metrics (admin port)"
    )
    prom.add_argument("action", choices=("up", "down", "url", "query"))
    prom.add_argument("promql", nargs="?", help="query: the PromQL to evaluate now")
    prom.add_argument(
        "--dir", type=Path, default=None, help="cluster state directory (default: the dev cluster)"
    )
    prom.add_argument("--namespace", default="tensorwasm-monitoring", help="where Prometheus runs")
    prom.add_argument(
        "--watch",
        action="append",
        default=None,
        help="namespace of the shards to scrape (repeat; default tensorwasm)",
    )
    prom.add_argument(
        "--discovery-image",
        default=None,
        help="image with python3 for the discovery sidecar (the chart's image)",
    )
    prom.set_defaults(handler=run_prometheus)


def run_prometheus(args: argparse.Namespace) -> int:
    from tensorwasm.cli.dev import dev_tools_missing, log, recorded_cluster

    if dev_tools_missing():
        return 2
    from tensorwasm.dev import prometheus
    from tensorwasm.dev.cluster import ClusterError

    try:
        plane, state = recorded_cluster(args.dir)
        dev = prometheus.DevPrometheus(
            plane, state, args.namespace, args.watch or ["tensorwasm"],
            args.discovery_image or prometheus.DEFAULT_DISCOVERY_IMAGE, log=log,
        )  # fmt: skip
        if args.action == "up":
            print(dev.up())
        elif args.action == "down":
            dev.down()
        elif args.action == "url":
            print(dev.url())
        else:
            if not args.promql:
                raise ClusterError("query needs PromQL: tensorwasm dev prometheus query 'up'")
            print(json.dumps(prometheus.query(dev.url(), args.promql), indent=1))
        return 0
    except ClusterError as exc:
        log(f"error: {exc}")
        return 1
