"""Both autoscaler paths of the chart really scale the shard StatefulSet, on the real node.

A shard StatefulSet (the tensorwasm image, standalone tenants from a ConfigMap, behind the operator's
own shard Service) is scraped by the dev Prometheus. The chart renders the autoscaler, and a real
aggregated metrics API feeds it: the HPA path's custom.metrics.k8s.io (hack/autoscaling, the
prometheus-adapter rule) or KEDA built from its module (external.metrics.k8s.io, the ScaledObject's
Prometheus trigger). A bounded load keeps one tenant's queue full on shard 0; the HPA must report
the queue depth, raise status.desiredReplicas and the StatefulSet's replicas, and bring both back to
1 once the load stops and the (shortened) scale-down window has passed. The timings are printed
(load step -> Prometheus sees it -> first scale decision) for docs/performance.md.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tensorwasm.dev import autoscalers
from tensorwasm.dev import prometheus as dev_prometheus
from tensorwasm.dev.cluster import LocalControlPlane
from tensorwasm.operator.settings import load_settings
from tests.conftest import Kube, wait_for

from .test_helm import one, render
from .test_prometheus import SPIN_QUEUE, SPIN_TOKEN, build_standalone_shard, scraped_workload

pytestmark = pytest.mark.node

MAX_REPLICAS = 3
# Scale down 20 s after the load is gone (the chart's default is 600 s: each move costs a snapshot).
FAST_BEHAVIOR = {
    "scaleDown": {"stabilizationWindowSeconds": 20,
                  "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]},
    "scaleUp": {"stabilizationWindowSeconds": 0,
                "policies": [{"type": "Pods", "value": 4, "periodSeconds": 15}]},
}  # fmt: skip


@dataclass(frozen=True)
class Env:
    kube: Kube
    plane: LocalControlPlane
    namespace: str
    shard: str
    pod_ip: str
    prometheus_url: str
    image: str

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        return self.kube.kubectl(*args, input_text=input_text, check=check)

    def apply(self, *items: dict[str, Any]) -> None:
        doc = {"apiVersion": "v1", "kind": "List", "items": list(items)}
        self.kubectl("apply", "-n", self.namespace, "-f", "-", input_text=json.dumps(doc))


def build_shard_statefulset(pod: dict[str, Any], name: str) -> dict[str, Any]:
    """The standalone shard pod as the StatefulSet the operator would own (same name and labels)."""
    labels = pod["metadata"]["labels"]
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": pod["metadata"]["namespace"], "labels": labels},
        "spec": {"replicas": 1, "serviceName": name, "podManagementPolicy": "Parallel",
                 "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": pod["spec"]}},
    }  # fmt: skip


@pytest.fixture(scope="module")
def env(kube: Kube) -> Iterator[Env]:
    shard = load_settings({}).shard_name

    def workload(namespace: str, image: str) -> tuple[list[dict[str, Any]], str]:
        files, service, pod = build_standalone_shard(namespace, image)
        return [files, service, build_shard_statefulset(pod, shard)], f"{shard}-0"

    with scraped_workload(kube, "autoscale", workload) as s:
        yield Env(kube, s.plane, s.namespace, shard, s.pod_ip, s.prometheus_url, s.image)


def chart_autoscaler(env: Env, tmp_path: Path, *sets: str) -> dict[str, Any]:
    values = tmp_path / "behavior.yaml"
    values.write_text(yaml.safe_dump({"autoscaling": {"behavior": FAST_BEHAVIOR}}))
    docs = render(
        env.kube, "autoscaling.enabled=true", "autoscaling.targetAverageValue=1",
        f"autoscaling.maxReplicas={MAX_REPLICAS}", f"shard.name={env.shard}", *sets,
        namespace=env.namespace, extra=("--values", str(values)),
    )  # fmt: skip
    kinds = [d["kind"] for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert len(kinds) == 1
    return one(docs, kinds[0])


def scale_cycle(env: Env, hpa_name: str) -> dict[str, float]:
    """Load up -> the HPA reports the depth and scales out -> load gone -> back to 1. Returns timings."""
    kubectl = env.kubectl
    wait_for(lambda: autoscalers.hpa_state(kubectl, env.namespace, hpa_name)[1] is not None, 180,
             f"HPA {hpa_name} to report the metric (before any load)", interval=1)  # fmt: skip
    assert autoscalers.hpa_state(kubectl, env.namespace, hpa_name) == (1, 0.0)
    load = autoscalers.QueueLoad(f"http://{env.pod_ip}:8080", "spin", SPIN_TOKEN, concurrency=1 + SPIN_QUEUE)
    load.start()
    try:
        seen = f'sum(tensorwasm_queue_depth{{namespace="{env.namespace}", pod="{env.shard}-0"}}) >= 1'
        dev_prometheus.wait_for_series(env.prometheus_url, seen, timeout_s=90)
        t_prometheus = time.monotonic() - load.started_at
        desired, value = wait_for(
            lambda: (s := autoscalers.hpa_state(kubectl, env.namespace, hpa_name))[0] > 1 and s,
            180, f"HPA {hpa_name} to scale out", interval=0.5,
        )  # fmt: skip
        t_decision = time.monotonic() - load.started_at
        assert value is not None and value >= 1, "the HPA scaled out on the queue depth it reports"
        assert 1 < desired <= MAX_REPLICAS
        wait_for(lambda: autoscalers.statefulset_replicas(kubectl, env.namespace, env.shard) > 1, 60,
                 "the StatefulSet's replicas to follow")  # fmt: skip
        t_replicas = time.monotonic() - load.started_at
    finally:
        statuses = load.stop()
    print(f"load statuses: {statuses} (Retry-After on {load.retry_after})")
    assert set(statuses) <= {200, 429, 504}, "only the spin's deadline and 429 with Retry-After"
    assert load.retry_after >= statuses.get(429, 0)
    stopped = time.monotonic()
    wait_for(lambda: autoscalers.hpa_state(kubectl, env.namespace, hpa_name)[0] == 1, 240,
             "the HPA to scale back in once the load stopped", interval=1)  # fmt: skip
    wait_for(lambda: autoscalers.statefulset_replicas(kubectl, env.namespace, env.shard) == 1, 60,
             "the StatefulSet back to 1 replica")  # fmt: skip
    timings = {"prometheus_s": t_prometheus, "decision_s": t_decision, "replicas_s": t_replicas,
               "scale_in_s": time.monotonic() - stopped}  # fmt: skip
    print(f"{hpa_name}: " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    record = os.environ.get("TENSORWASM_AUTOSCALE_TIMINGS")  # bench/bench_autoscaling.py collects these
    if record:
        with Path(record).open("a") as out:
            out.write(json.dumps({"hpa": hpa_name, **timings, "statuses": statuses}) + "\n")
    return timings


def test_hpa_path_scales_on_the_custom_metrics_api(env: Env, tmp_path: Path) -> None:
    state = env.plane.state()
    assert state is not None
    dev = autoscalers.DevAutoscalers(env.plane, state, log=print)
    dev.custom_metrics_up(env.prometheus_url, env.image)
    hpa = chart_autoscaler(env, tmp_path)  # provider hpa is the default
    try:
        # The metrics API answers through the aggregation layer (TLS to the APIService's caBundle).
        # Prometheus has the series only after its first scrape of the shard (slow on a busy machine).
        path = f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/{env.namespace}/pods/*/tensorwasm_queue_depth"

        def described() -> list[str] | None:
            items = json.loads(env.kubectl("get", "--raw", path))["items"]
            return [i["describedObject"]["name"] for i in items] or None

        assert wait_for(described, 120, "the custom metrics API to describe the shard") == [f"{env.shard}-0"]
        env.apply(hpa)
        scale_cycle(env, env.shard)
    finally:
        env.kubectl("delete", "hpa", env.shard, "-n", env.namespace, "--ignore-not-found")
        env.kubectl("scale", "statefulset", env.shard, "-n", env.namespace, "--replicas=1")


def require_keda() -> None:
    """Skip, saying how to build it, when KEDA is not built and may not be built by this run."""
    if autoscalers.keda_built() is None and os.environ.get("TENSORWASM_BUILD_KEDA") != "1":
        pytest.skip(
            "KEDA is not built: `bash hack/controlplane/build.sh keda` (47 min cold on 2 busy cores, then "
            "cached), or TENSORWASM_BUILD_KEDA=1 to build it here"
        )


def test_keda_scales_through_its_scaledobject(env: Env, tmp_path: Path) -> None:
    require_keda()
    state = env.plane.state()
    assert state is not None
    dev = autoscalers.DevAutoscalers(env.plane, state, log=print)
    dev.keda_up()
    scaled = chart_autoscaler(
        env, tmp_path, "autoscaling.provider=keda", f"autoscaling.keda.serverAddress={env.prometheus_url}",
        "autoscaling.keda.pollingInterval=5",
    )  # fmt: skip
    try:
        env.apply(scaled)
        hpa_name = f"keda-hpa-{env.shard}"
        wait_for(lambda: env.kubectl("get", "hpa", hpa_name, "-n", env.namespace, check=False), 120,
                 "KEDA to create its HPA")  # fmt: skip
        so = json.loads(env.kubectl("get", "scaledobject", env.shard, "-n", env.namespace, "-o", "json"))
        assert so["spec"]["scaleTargetRef"]["name"] == env.shard
        scale_cycle(env, hpa_name)
        ready = json.loads(env.kubectl("get", "scaledobject", env.shard, "-n", env.namespace, "-o", "json"))
        conditions = {c["type"]: c["status"] for c in ready["status"]["conditions"]}
        assert conditions["Ready"] == "True", ready["status"]
    finally:
        env.kubectl("delete", "scaledobject", env.shard, "-n", env.namespace, "--ignore-not-found")
        env.kubectl("scale", "statefulset", env.shard, "-n", env.namespace, "--replicas=1")
