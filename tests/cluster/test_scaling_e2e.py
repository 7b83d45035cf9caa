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
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.api.group import API_VERSION
from tensorwasm.dev.chart import DevRelease, build_image
from tensorwasm.dev.cluster import LocalControlPlane, default_state_dir
from tensorwasm.dev.scaling import ScalingRun
from tests.conftest import REPO

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]  # a first image build included

NAMESPACE = "tw-scaling-e2e"
COUNTER = REPO / "examples" / "modules" / "counter.wasm"
TENANTS = [f"c{i}" for i in range(6)]


@pytest.fixture(scope="module")
def release(kube: Any) -> Iterator[DevRelease]:
    state_dir = Path(
        os.environ.get("TENSORWASM_TEST_CLUSTER_DIR", default_state_dir().parent / "test-cluster")
    )
    plane = LocalControlPlane(state_dir)
    state = plane.state()
    if state is None or state.node_slot is None:
        pytest.skip("the test cluster runs without its real node (TENSORWASM_TEST_REAL_NODE=0)")
    dev = DevRelease(plane, state, NAMESPACE)
    dev.uninstall()  # an earlier run's, if it was interrupted
    dev.prepare(build_image())
    dev.install("crds.enabled=false", "shard.replicas=1")
    yield dev
    dev.uninstall()


def counter_tenant(name: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Tenant",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "module": {
                "configMapRef": {"name": "counter-module", "key": "module.wasm"},
                "sha256": hashlib.sha256(COUNTER.read_bytes()).hexdigest(),
            },
            "functions": ["add"],
            "limits": {"gpuMemory": "4Mi", "linearMemory": "1Mi", "timeoutMs": 1000, "maxConcurrency": 1},
        },
    }


def counter_module() -> dict[str, Any]:
    import base64

    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "counter-module", "namespace": NAMESPACE},
        "binaryData": {"module.wasm": base64.b64encode(COUNTER.read_bytes()).decode()},
    }


def test_scale_out_and_in_under_load_keeps_every_request_and_every_write(release: DevRelease) -> None:
    release.apply(counter_module(), *(counter_tenant(n) for n in TENANTS))
    for name in TENANTS:
        release.wait_tenant_ready(name)
    access = {n: (a.url, a.token) for n in TENANTS for a in [release.access(n)]}
    for name in access:  # each ClusterIP programmed before the clock starts
        assert release.access(name).invoke("add", b"")[0] == 200
    run = ScalingRun(release.kubectl, NAMESPACE)
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
