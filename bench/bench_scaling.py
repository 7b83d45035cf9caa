"""Scale-out and scale-in of the shard StatefulSet on the real node under load: how long until the
new shard serves the tenants that moved to it, how long until they are home again, and every request.

Starts a cluster of its own with a real node (`~/.cache/tensorwasm/bench-scaling-cluster`, removed
after), installs the chart with one shard and six counter tenants (counter.wasm), and runs one client
per tenant (tensorwasm.dev.scaling: adds 1 through the tenant's ClusterIP as fast as answered,
Retry-After honoured on 429/503, each total checked against the previous one). `kubectl scale` to 2
(what an autoscaler writes to /scale), then back to 1. Scale-out is measured from the scale call to
(a) the new pod Ready, the floor any move waits for, (b) every moved tenant settled on it (placed,
restored, Service re-pointed) and (c) each of them answering its client. Scale-in: from the scale call
to every tenant home and answering. Needs root (the real node).
"""

from __future__ import annotations

import base64
import hashlib
import sys
from pathlib import Path
from typing import Any

from tensorwasm.api.group import API_VERSION
from tensorwasm.dev.chart import DevRelease, build_image
from tensorwasm.dev.cluster import REPO_ROOT
from tensorwasm.dev.scaling import ScalingRun

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_cluster import bench_cluster

NAMESPACE = "tw-bench-scaling"
COUNTER = REPO_ROOT / "examples" / "modules" / "counter.wasm"
TENANTS = [f"c{i}" for i in range(6)]


def _objects() -> list[dict[str, Any]]:
    wasm = COUNTER.read_bytes()
    ref = {
        "configMapRef": {"name": "counter-module", "key": "module.wasm"},
        "sha256": hashlib.sha256(wasm).hexdigest(),
    }
    limits = {"gpuMemory": "4Mi", "linearMemory": "1Mi", "timeoutMs": 1000, "maxConcurrency": 1}
    module = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "counter-module", "namespace": NAMESPACE},
        "binaryData": {"module.wasm": base64.b64encode(wasm).decode()},
    }
    tenants = [
        {
            "apiVersion": API_VERSION,
            "kind": "Tenant",
            "metadata": {"name": n, "namespace": NAMESPACE},
            "spec": {"module": ref, "functions": ["add"], "limits": limits},
        }
        for n in TENANTS
    ]
    return [module, *tenants]


def measure(release: DevRelease) -> dict[str, Any]:
    release.apply(*_objects())
    for name in TENANTS:
        release.wait_tenant_ready(name)
    for name in TENANTS:  # every ClusterIP programmed before the clock starts
        assert release.access(name).invoke("add", b"")[0] == 200
    access = {n: (a.url, a.token) for n in TENANTS for a in [release.access(n)]}
    run = ScalingRun(release.kubectl, release.namespace, log=lambda m: None)
    run.start(access, max_seconds=900)
    try:
        out = run.scale(2)
        back = run.scale(1)
    finally:
        totals = run.stop()
    failed = sum(v for k, v in totals.items() if k != "200" and not k.startswith(("503:", "429:")))
    return {
        "scale_out_pod_ready_s": round(out.pods_ready_s or 0.0, 1),
        "scale_out_moved_settled_s": round(out.settled_s, 1),
        "scale_out_moved_serving_s": round(out.serving_s, 1),
        "scale_out_moved_tenants": len(out.moved),
        "scale_in_settled_s": round(back.settled_s, 1),
        "scale_in_serving_s": round(back.serving_s, 1),
        "requests_ok": totals["200"],
        "requests_retried_503_moving": totals["503:tenant_moving"],
        "requests_retried_503_not_ready": totals["503:tenant_not_ready"],
        "requests_retried_429": sum(v for k, v in totals.items() if k.startswith("429:")),
        "requests_failed": failed,
        "writes_lost_or_repeated": len([e for e in run.errors() if "total" in e]),
        "client_errors": len(run.errors()),
    }


def run() -> dict[str, Any]:
    # TENSORWASM_BENCH_CLUSTER_DIR (the test cluster's state directory, say): see real_cluster.py.
    with bench_cluster("bench-scaling-cluster") as (plane, state, reuse):
        release = DevRelease(plane, state, NAMESPACE, log=lambda m: None)
        release.uninstall()  # an interrupted run's
        release.prepare(build_image(log=lambda m: None))
        release.install(f"crds.enabled={'false' if reuse else 'true'}", "shard.replicas=1")
        figures = measure(release)
        release.uninstall()
    return {
        "title": "Shard scale-out and scale-in on the real node under load (kubectl scale 1 -> 2 -> 1)",
        "figures": figures,
        "targets": {
            "scale_out_moved_serving_s": "<= 45",
            "requests_failed": "<= 0",
            "writes_lost_or_repeated": "<= 0",
            "client_errors": "<= 0",
        },
        "notes": __doc__.split("\n\n", 1)[1].replace("\n", " ")
        + (f" This run: on the running cluster in {reuse} (TENSORWASM_BENCH_CLUSTER_DIR)." if reuse else ""),
    }
