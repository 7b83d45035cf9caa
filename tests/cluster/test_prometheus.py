"""A real Prometheus (tensorwasm.dev.prometheus) on the real node scrapes a real shard pod.

The shard is `tensorwasm runtime` from the project's image in standalone mode (one echo tenant from a
ConfigMap), behind the headless Service the operator's own builder makes; Prometheus finds it the way
the chart's ServiceMonitor selects it (Service labels, port `admin`), with the target labels the
alerts and the KEDA query use (namespace, job = Service name, pod). Invokes through the pod's address
show up in tensorwasm_invocations_total, and the scaling signal is queried as KEDA would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.dev import chart
from tensorwasm.dev import prometheus as dev_prometheus
from tensorwasm.dev.cluster import LocalControlPlane
from tensorwasm.dev.node import REAL_NODE_LABEL
from tensorwasm.operator.desired.meta import shard_labels
from tensorwasm.operator.desired.shards import (
    RESTRICTED_CONTAINER_SECURITY,
    RESTRICTED_POD_SECURITY,
    build_shard_service,
)
from tensorwasm.operator.settings import load_settings
from tests.conftest import REPO, Kube, wait_for

pytestmark = pytest.mark.node

ECHO = REPO / "examples" / "modules" / "echo.wasm"
SPIN = REPO / "tests" / "fixtures" / "runaway.wat"
TOKEN = "prometheus-test-token-0001"
SPIN_TOKEN = "prometheus-test-token-0002"
# A full queue drains in 12 s, so at least two 5 s scrapes see it; the first spin's 3 s leave time
# to see the queue full and be refused.
SPIN_MS, SPIN_QUEUE = 3000, 4
INVOKES = 5
SHARD = "tensorwasm-shard-0"


def build_standalone_shard(namespace: str, image: str) -> list[dict[str, Any]]:
    """The operator's shard Service and one standalone shard pod behind it (no Tenant objects needed)."""
    settings = load_settings({"POD_NAMESPACE": namespace})
    service = build_shard_service(settings)
    tenants = {"tenants": [{
        "name": "echo", "token": TOKEN, "functions": ["echo"],
        "module": {"path": "echo.wasm", "sha256": hashlib.sha256(ECHO.read_bytes()).hexdigest()},
        "limits": {"linearMemory": "16Mi", "maxConcurrency": 2, "queueLength": 8},
    }, {
        # Each `spin` holds the one worker until its deadline, so invokes queue up behind it.
        "name": "spin", "token": SPIN_TOKEN, "functions": ["spin"],
        "module": {"path": "runaway.wat", "sha256": hashlib.sha256(SPIN.read_bytes()).hexdigest()},
        "limits": {"linearMemory": "1Mi", "timeoutMs": SPIN_MS, "maxConcurrency": 1,
                   "queueLength": SPIN_QUEUE},
    }]}  # fmt: skip
    files = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shard-files", "namespace": namespace},
        "data": {"tenants.yaml": json.dumps(tenants), "runaway.wat": SPIN.read_text()},
        "binaryData": {"echo.wasm": base64.b64encode(ECHO.read_bytes()).decode()},
    }  # fmt: skip
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{settings.shard_name}-0", "namespace": namespace,
                     "labels": shard_labels(settings.shard_name)},
        "spec": {
            "nodeSelector": {REAL_NODE_LABEL: "true"},
            "tolerations": [{"key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
            "securityContext": RESTRICTED_POD_SECURITY,
            "containers": [{
                "name": "runtime", "image": image, "imagePullPolicy": "IfNotPresent",
                "args": ["runtime", "--tenants-file", "/etc/tw/tenants.yaml", "--accelerator", "cpu",
                         "--listen", f"0.0.0.0:{settings.runtime_port}",
                         "--admin-listen", f"0.0.0.0:{settings.admin_port}"],
                "ports": [{"name": "http", "containerPort": settings.runtime_port},
                          {"name": "admin", "containerPort": settings.admin_port}],
                "securityContext": RESTRICTED_CONTAINER_SECURITY,
                "volumeMounts": [{"name": "files", "mountPath": "/etc/tw"},
                                 {"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "files", "configMap": {"name": "shard-files"}},
                        {"name": "tmp", "emptyDir": {}}],
        },
    }  # fmt: skip
    return [files, service, pod]


def invoke(url: str, function: str = "echo", token: str = TOKEN) -> tuple[int, str | None]:
    """Status and Retry-After of one invoke."""
    request = urllib.request.Request(
        f"{url}/v1/functions/{function}/invoke", data=b"hi", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status), response.headers.get("Retry-After")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.headers.get("Retry-After")


def shard_gauge(admin_url: str, series: str) -> float | None:
    """One sample of the shard's own /metrics (what the next scrape will read)."""
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[1])
    return None


def pod_ip_when_ready(kube: Kube, namespace: str, name: str) -> str | None:
    pod = json.loads(kube.kubectl("get", "pod", name, "-n", namespace, "-o", "json"))
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))
    return str(pod["status"]["podIP"]) if ready else None


@dataclass(frozen=True)
class Deployed:
    namespace: str
    pod_ip: str
    prometheus_url: str

    @property
    def target(self) -> str:
        return f'namespace="{self.namespace}", job="tensorwasm-shard", pod="{SHARD}"'


@dataclass(frozen=True)
class Scraped:
    plane: LocalControlPlane
    namespace: str
    pod_ip: str
    prometheus_url: str
    image: str


Workload = Callable[[str, str], tuple[list[dict[str, Any]], str]]  # (namespace, image) -> (objects, pod)


@contextmanager
def scraped_workload(kube: Kube, prefix: str, workload: Workload) -> Iterator[Scraped]:
    """On the test cluster's real node, in a namespace of its own (deleted after): the project's image
    imported, the objects `workload` builds applied, its pod Ready, the dev Prometheus scraping it."""
    plane = LocalControlPlane(Path(kube.kubeconfig).parent, log=lambda _m: None)
    state = plane.state()
    assert state is not None and state.node_slot is not None, "the test cluster has no real node"
    namespace = f"t-{prefix}-{os.getpid()}-{time.time_ns() % 10**6}"
    kube.kubectl("create", "namespace", namespace)
    try:
        image = chart.build_image(log=print)
        plane.import_image(state, image.archive)
        items, pod = workload(namespace, image.ref)
        kube.kubectl(
            "apply", "-f", "-", input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        )
        pod_ip = wait_for(lambda: pod_ip_when_ready(kube, namespace, pod), 180, f"pod {pod} Ready")
        prom = dev_prometheus.DevPrometheus(plane, state, namespace, [namespace], image.ref, log=print)
        yield Scraped(plane, namespace, pod_ip, prom.up(), image.ref)
    finally:
        kube.kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found")


@pytest.fixture(scope="module")
def deployed(kube: Kube) -> Iterator[Deployed]:
    """A standalone shard and the dev Prometheus watching it, in a namespace of their own."""
    with scraped_workload(kube, "prometheus", lambda ns, ref: (build_standalone_shard(ns, ref), SHARD)) as s:
        yield Deployed(s.namespace, s.pod_ip, s.prometheus_url)


def test_discovery_selects_what_the_operator_labels_shard_services() -> None:
    assert dev_prometheus.SHARD_SERVICE_LABELS.items() <= shard_labels("any-shard").items()


def test_prometheus_scrapes_a_shard_and_answers_the_scaling_query(deployed: Deployed) -> None:
    url, target = deployed.prometheus_url, deployed.target
    [up] = dev_prometheus.wait_for_series(url, f"up{{{target}}} == 1", timeout_s=120)
    assert up["metric"]["endpoint"] == "admin" and up["metric"]["service"] == "tensorwasm-shard"

    calls = [invoke(f"http://{deployed.pod_ip}:8080") for _ in range(INVOKES)]
    assert [status for status, _ in calls] == [200] * INVOKES
    ok = f'tensorwasm_invocations_total{{{target}, tenant="echo", outcome="ok"}} == {INVOKES}'
    dev_prometheus.wait_for_series(url, ok, timeout_s=60)  # the next scrape carries them

    # The scaling signal as KEDA's default trigger asks for it, and per shard as the HPA path reads it.
    keda_query = f'sum(tensorwasm_queue_depth{{namespace="{deployed.namespace}", job="tensorwasm-shard"}})'
    [total] = dev_prometheus.query(url, keda_query)
    assert float(total["value"][1]) >= 0
    per_pod = dev_prometheus.query(
        url, f'sum by (pod) (tensorwasm_queue_depth{{namespace="{deployed.namespace}"}})'
    )
    assert [s["metric"]["pod"] for s in per_pod] == [SHARD]


def test_the_signal_rises_before_429_and_falls_when_load_stops(deployed: Deployed) -> None:
    """1 running + a full queue of `spin`: the next invoke gets 429 (with Retry-After) while
    Prometheus sees the queue depth above 0, and the depth is back to 0 once the queue drains."""
    url, admin = f"http://{deployed.pod_ip}:8080", f"http://{deployed.pod_ip}:9090"
    depth = 'tensorwasm_queue_depth{tenant="spin"}'
    with ThreadPoolExecutor(max_workers=1 + SPIN_QUEUE) as pool:
        held = [pool.submit(invoke, url, "spin", SPIN_TOKEN) for _ in range(1 + SPIN_QUEUE)]
        wait_for(lambda: shard_gauge(admin, depth) == SPIN_QUEUE, 30, "the spin queue to fill")
        status, retry_after = invoke(url, "spin", SPIN_TOKEN)
        assert status == 429 and retry_after, "the invoke past a full queue is refused with Retry-After"
        seen = f'max_over_time(tensorwasm_queue_depth{{{deployed.target}, tenant="spin"}}[1m]) >= 1'
        dev_prometheus.wait_for_series(deployed.prometheus_url, seen, timeout_s=60)
        results = [f.result(timeout=120) for f in held]
    assert {s for s, _ in results} == {504}, "every held invoke ran to its deadline, none was refused"
    drained = f'tensorwasm_queue_depth{{{deployed.target}, tenant="spin"}} == 0'
    dev_prometheus.wait_for_series(deployed.prometheus_url, drained, timeout_s=60)
