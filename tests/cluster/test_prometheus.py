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
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.dev import chart
from tensorwasm.dev import prometheus as dev_prometheus
from tensorwasm.dev.cluster import ClusterState, LocalControlPlane
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
TOKEN = "prometheus-test-token-0001"
INVOKES = 5


def build_standalone_shard(namespace: str, image: str) -> list[dict[str, Any]]:
    """The operator's shard Service and one standalone shard pod behind it (no Tenant objects needed)."""
    settings = load_settings({"POD_NAMESPACE": namespace})
    service = build_shard_service(settings)
    tenants = {"tenants": [{
        "name": "echo", "token": TOKEN, "functions": ["echo"],
        "module": {"path": "echo.wasm", "sha256": hashlib.sha256(ECHO.read_bytes()).hexdigest()},
        "limits": {"linearMemory": "16Mi", "maxConcurrency": 2, "queueLength": 8},
    }]}  # fmt: skip
    files = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shard-files", "namespace": namespace},
        "data": {"tenants.yaml": json.dumps(tenants)},
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


def invoke(url: str) -> int:
    request = urllib.request.Request(
        f"{url}/v1/functions/echo/invoke", data=b"hi", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def pod_ip_when_ready(kube: Kube, namespace: str, name: str) -> str | None:
    pod = json.loads(kube.kubectl("get", "pod", name, "-n", namespace, "-o", "json"))
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))
    return str(pod["status"]["podIP"]) if ready else None


def recorded(kube: Kube) -> tuple[LocalControlPlane, ClusterState]:
    plane = LocalControlPlane(Path(kube.kubeconfig).parent, log=lambda _m: None)
    state = plane.state()
    assert state is not None and state.node_slot is not None, "the test cluster has no real node"
    return plane, state


def test_discovery_selects_what_the_operator_labels_shard_services() -> None:
    assert dev_prometheus.SHARD_SERVICE_LABELS.items() <= shard_labels("any-shard").items()


def test_prometheus_scrapes_a_shard_and_answers_the_scaling_query(kube: Kube, namespace: str) -> None:
    plane, state = recorded(kube)
    image = chart.build_image(log=print)
    plane.import_image(state, image.archive)
    items = build_standalone_shard(namespace, image.ref)
    kube.kubectl(
        "apply", "-f", "-", input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    )
    pod_ip = wait_for(
        lambda: pod_ip_when_ready(kube, namespace, "tensorwasm-shard-0"), 180, "the shard pod Ready"
    )

    prom = dev_prometheus.DevPrometheus(plane, state, namespace, [namespace], image.ref, log=print)
    url = prom.up()
    target = f'namespace="{namespace}", job="tensorwasm-shard", pod="tensorwasm-shard-0"'
    [up] = dev_prometheus.wait_for_series(url, f"up{{{target}}} == 1", timeout_s=120)
    assert up["metric"]["endpoint"] == "admin" and up["metric"]["service"] == "tensorwasm-shard"

    assert [invoke(f"http://{pod_ip}:8080") for _ in range(INVOKES)] == [200] * INVOKES
    ok = f'tensorwasm_invocations_total{{{target}, tenant="echo", outcome="ok"}} == {INVOKES}'
    dev_prometheus.wait_for_series(url, ok, timeout_s=60)  # the next scrape carries them

    # The scaling signal as KEDA's default trigger asks for it, and per shard as the HPA path reads it.
    keda_query = f'sum(tensorwasm_queue_depth{{namespace="{namespace}", job="tensorwasm-shard"}})'
    [total] = dev_prometheus.query(url, keda_query)
    assert float(total["value"][1]) == 0  # nothing queued once the invokes returned
    per_pod = dev_prometheus.query(url, f'sum by (pod) (tensorwasm_queue_depth{{namespace="{namespace}"}})')
    assert [s["metric"]["pod"] for s in per_pod] == ["tensorwasm-shard-0"]
    prom.down()
