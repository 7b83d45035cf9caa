"""The shard set scales 1 -> 2 -> 1 on the real node under load, and no request or write is lost.

The chart's operator and shard pods on the dev cluster's real node; six counter tenants, each with
a client (tensorwasm.dev.scaling) that adds 1 through the tenant's ClusterIP as fast as it is
answered, honouring Retry-After on 429/503, and checks every total is the previous one plus 1.
The StatefulSet is scaled with `kubectl scale` (what an HPA writes to /scale). Scale-out: the new
pod becomes Ready, the tenants rendezvous hashing gives it move there through the barrier and keep
their counts. Scale-in: the removed pod hands them back while it terminates. Every request is
counted: only 429/503 with Retry-After of the retryable kinds are allowed, and none is lost.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.api.group import API_VERSION
from tensorwasm.dev import autoscalers
from tensorwasm.dev import prometheus as dev_prometheus
from tensorwasm.dev.chart import DevRelease, build_image
from tensorwasm.dev.scaling import ScalingRun
from tests.conftest import REPO, real_node_release, wait_for

from .test_autoscalers import require_keda
from .test_helm import one, render

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]  # a first image build included

NAMESPACE_PREFIX = "tw-scaling-e2e"
COUNTER = REPO / "examples" / "modules" / "counter.wasm"
TENANTS = [f"c{i}" for i in range(6)]


@pytest.fixture(scope="module")
def release(kube: Any) -> Iterator[DevRelease]:
    """One release for the module's tests, in a namespace of this run's own: two runs on one cluster
    (a CI run beside a developer's) do not install into, scale or uninstall each other's release."""
    dev = real_node_release(f"{NAMESPACE_PREFIX}-{secrets.token_hex(4)}")
    dev.install("crds.enabled=false", "shard.replicas=1")
    yield dev
    dev.uninstall()


def counter_tenant(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Tenant",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "module": {
                "configMapRef": {"name": "counter-module", "key": "module.wasm"},
                "sha256": hashlib.sha256(COUNTER.read_bytes()).hexdigest(),
            },
            "functions": ["add"],
            "limits": {"gpuMemory": "4Mi", "linearMemory": "1Mi", "timeoutMs": 1000, "maxConcurrency": 1},
        },
    }


def counter_module(namespace: str) -> dict[str, Any]:
    import base64

    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "counter-module", "namespace": namespace},
        "binaryData": {"module.wasm": base64.b64encode(COUNTER.read_bytes()).decode()},
    }


def test_scale_out_and_in_under_load_keeps_every_request_and_every_write(release: DevRelease) -> None:
    release.apply(counter_module(release.namespace), *(counter_tenant(n, release.namespace) for n in TENANTS))
    for name in TENANTS:
        release.wait_tenant_ready(name)
    access = {n: (a.url, a.token) for n in TENANTS for a in [release.access(n)]}
    for name in access:  # each ClusterIP programmed before the clock starts
        assert release.access(name).invoke("add", b"")[0] == 200
    run = ScalingRun(release.kubectl, release.namespace)
    run.start(access, max_seconds=600)
    try:
        out = run.scale(2)
        assert out.moved and all(to == "tensorwasm-shard-1" for _, to in out.moved.values()), out.moved
        back = run.scale(1)
        assert set(back.moved) == set(out.moved), "scale-in moves back exactly the tenants that left"
    finally:
        totals = run.stop()
    print(f"scale-out {out}; scale-in {back}; outcomes {dict(totals)}")
    assert run.errors() == []
    assert set(totals) <= {"200", "503:tenant_moving", "503:tenant_not_ready", "429:queue_full"}, totals
    # Every write counted once: each client's last total is its first plus its other 200s.
    for client in run.clients.values():
        assert client.outcomes["200"] > 0
    status = run.placements()
    assert all(s["shard"] == "tensorwasm-shard-0" for s in status.values()), json.dumps(status)[:2000]


SPIN = REPO / "tests" / "fixtures" / "runaway.wat"
SPIN_MS, SPIN_QUEUE = 3000, 4
# Scale in 20 s after the load is gone (the chart's default waits 600 s: each move costs a snapshot).
FAST_BEHAVIOR = {
    "scaleDown": {"stabilizationWindowSeconds": 20,
                  "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]},
    "scaleUp": {"stabilizationWindowSeconds": 0,
                "policies": [{"type": "Pods", "value": 4, "periodSeconds": 15}]},
}  # fmt: skip


def spin_objects(namespace: str) -> list[dict[str, Any]]:
    import base64

    import wasmtime

    wasm = bytes(wasmtime.wat2wasm(SPIN.read_text()))
    module = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": "spin-module", "namespace": namespace},
              "binaryData": {"module.wasm": base64.b64encode(wasm).decode()}}  # fmt: skip
    tenant = {
        "apiVersion": API_VERSION, "kind": "Tenant", "metadata": {"name": "spin", "namespace": namespace},
        "spec": {"module": {"configMapRef": {"name": "spin-module", "key": "module.wasm"},
                            "sha256": hashlib.sha256(wasm).hexdigest()},
                 "functions": ["spin"], "snapshot": {"policy": "Manual"},
                 "limits": {"linearMemory": "1Mi", "timeoutMs": SPIN_MS, "maxConcurrency": 1,
                            "queueLength": SPIN_QUEUE}},
    }  # fmt: skip
    return [module, tenant]


class SpinLoad:
    """Keeps the spin tenant's worker and queue full (1 + SPIN_QUEUE callers), honouring Retry-After
    on 429/503 like any good client; bounded in time; every status counted (0: no HTTP answer)."""

    def __init__(self, url: str, token: str, max_s: float = 300) -> None:
        self.url, self.token, self.max_s = url, token, max_s
        self.statuses: Counter[int] = Counter()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(1 + SPIN_QUEUE)]
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        for thread in self.threads:
            thread.start()

    def run(self) -> None:
        while not self.stop_event.is_set() and time.monotonic() - self.started_at < self.max_s:
            status, retry_after = autoscalers.invoke(self.url, "spin", self.token)
            self.statuses[status] += 1
            if status in (429, 503):
                self.stop_event.wait(min(float(retry_after or 1), 2.0))
            elif status == 0:
                self.stop_event.wait(0.2)

    def stop(self) -> dict[int, int]:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(SPIN_MS / 1000 * 3)
        return dict(self.statuses)


@pytest.mark.parametrize("provider", ["hpa", "keda"])
def test_the_autoscaler_scales_on_queue_depth_and_moved_tenants_keep_every_write(
    release: DevRelease, kube: Any, tmp_path: Path, provider: str
) -> None:
    """Load fills a tenant's queue -> Prometheus -> the autoscaler scales the operator's StatefulSet
    1 -> 2 -> the moved counters keep their totals -> load stops -> after the stabilization window it
    scales in and they move back. Every counting request is counted. Both of the chart's paths:
    `hpa` (its HPA on the custom metrics API) and `keda` (its ScaledObject: KEDA's operator makes
    the HPA, on KEDA's external metrics API, polling Prometheus every 5 s)."""
    if provider == "keda":
        require_keda()
    state = release.plane.state()
    assert state is not None
    image = build_image()
    ns = release.namespace
    prom = dev_prometheus.DevPrometheus(release.plane, state, f"{ns}-monitoring", [ns], image.ref)
    dev = autoscalers.DevAutoscalers(release.plane, state, log=print)
    release.apply(counter_module(ns), *(counter_tenant(n, ns) for n in TENANTS), *spin_objects(ns))
    for tenant in [*TENANTS, "spin"]:
        release.wait_tenant_ready(tenant)
    for tenant in TENANTS:  # each ClusterIP programmed, and an earlier variant's moves done, first
        access = release.access(tenant)
        wait_for(lambda a=access: a.invoke("add", b"")[0] == 200, 120, f"{tenant} to answer 200",
                 interval=1)  # fmt: skip
    values = tmp_path / "behavior.yaml"
    values.write_text(json.dumps({"autoscaling": {"behavior": FAST_BEHAVIOR}}))
    run = ScalingRun(release.kubectl, release.namespace)
    kind, name = "HorizontalPodAutoscaler", ""
    try:
        url = prom.up()
        sets = ["autoscaling.enabled=true", "autoscaling.targetAverageValue=1", "autoscaling.maxReplicas=2"]
        if provider == "keda":
            dev.keda_up()
            kind = "ScaledObject"
            sets += ["autoscaling.provider=keda", f"autoscaling.keda.serverAddress={url}",
                     "autoscaling.keda.pollingInterval=5"]  # fmt: skip
        else:
            dev.custom_metrics_up(url, image.ref)
        scaler = one(render(kube, *sets, namespace=ns, extra=("--values", str(values))), kind)
        # The HPA that scales: the chart's own, or the one KEDA's operator makes for the ScaledObject.
        name = scaler["metadata"]["name"] if provider == "hpa" else f"keda-hpa-{scaler['metadata']['name']}"
        release.apply(scaler)
        wait_for(lambda: autoscalers.hpa_state(release.kubectl, ns, name)[1] is not None, 240,
                 "the HPA to report the queue depth", interval=1)  # fmt: skip
        assert run.replicas() == 1
        run.start({n: (a.url, a.token) for n in TENANTS for a in [release.access(n)]}, max_seconds=900)
        spin = release.access("spin")
        assert spin.invoke("spin", b"x")[0] == 504, "the spin runs to its deadline"  # ClusterIP programmed
        before = {n: s.get("shard") for n, s in run.placements().items()}
        load = SpinLoad(spin.url, spin.token)
        load.start()
        try:
            wait_for(lambda: run.replicas() == 2, 240, "the HPA to scale the shards out", interval=0.5)
            decided = time.monotonic() - load.started_at
            out = run.settle(2, load.started_at, before, 1)
        finally:
            statuses = load.stop()
        stopped = time.monotonic()
        before = {n: s.get("shard") for n, s in run.placements().items()}
        wait_for(lambda: run.replicas() == 1, 300, "the HPA to scale back in", interval=1)
        back = run.settle(1, stopped, before, 2)
    finally:
        totals = run.stop()
        if provider == "keda":  # KEDA itself stays up, as test_autoscalers leaves it (built, shared)
            release.kubectl("delete", "scaledobject", "--all", "-n", ns, "--ignore-not-found",
                            check=False)  # fmt: skip
        else:
            release.kubectl("delete", "hpa", name, "-n", ns, "--ignore-not-found", check=False)
            dev.custom_metrics_down()
        prom.down()
    print(f"{provider}: decision {decided:.1f}s after the load step; scale-out {out}; scale-in {back}; "
          f"counters {dict(totals)}; spin load {statuses}")  # fmt: skip
    assert run.errors() == []
    assert set(totals) <= {"200", "503:tenant_moving", "503:tenant_not_ready", "429:queue_full"}, totals
    assert 0 not in statuses, "the load's own requests all got an HTTP answer"
    assert set(back.moved) == set(out.moved), "scale-in brings back exactly the tenants that moved"
    assert all(s["shard"] == "tensorwasm-shard-0" for s in run.placements().values())
