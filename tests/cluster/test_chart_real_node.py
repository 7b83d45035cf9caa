"""The Helm chart on the real node, as a user runs it: the project's image, real pods, real probes.

One release for the module (installing it builds nothing twice: the image is cached): the operator
and the shards run in containers under Pod Security "restricted", a tenant is invoked through its
Service's ClusterIP with the token from its Secret, a Snapshot survives the shard pod's replacement,
`helm test` passes, and a shard's ServiceAccount has only the shard's permissions.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from tensorwasm.api.group import API_VERSION
from tensorwasm.dev.chart import DevRelease, TenantAccess
from tests.conftest import REPO, Kube, real_node_release, wait_for

pytestmark = pytest.mark.node

NAMESPACE = "tw-chart-real-node"
COUNTER = REPO / "examples" / "modules" / "counter.wasm"


@pytest.fixture(scope="module")
def release(kube: Kube) -> Iterator[DevRelease]:
    dev = real_node_release(NAMESPACE)
    # The session applied crds/ already (tests/conftest.py): this release must not claim them.
    dev.install("crds.enabled=false")
    yield dev
    dev.uninstall()


def counter_tenant() -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Tenant",
        "metadata": {"name": "counter", "namespace": NAMESPACE},
        "spec": {
            "module": {
                "configMapRef": {"name": "counter-module", "key": "module.wasm"},
                "sha256": hashlib.sha256(COUNTER.read_bytes()).hexdigest(),
            },
            "functions": ["add"],
            "limits": {"gpuMemory": "4Mi", "linearMemory": "1Mi", "timeoutMs": 1000},
        },
    }


def pods(release: DevRelease) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(release.kubectl("get", "pods", "-n", NAMESPACE, "-o", "json"))[
        "items"
    ]
    return items


def test_chart_pods_run_on_the_real_node_under_pod_security_restricted(release: DevRelease) -> None:
    namespace = release.get("namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    running = wait_for(
        lambda: [p for p in pods(release) if p["status"].get("phase") == "Running"] or None,
        120,
        "the chart's pods running",
    )
    components = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in running}
    assert {"operator", "runtime-shard"} <= components
    for pod in running:
        assert pod["spec"]["nodeName"] == "tensorwasm-real", pod["metadata"]["name"]
        assert pod["status"]["podIP"].startswith("10.245."), "an address from the node's pod range"
        # Admitted under "restricted": the API server would have refused anything less.
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_tenant_serves_through_its_service_and_keeps_its_state_across_a_shard_restart(
    release: DevRelease,
) -> None:
    release.kubectl(
        "create", "configmap", "counter-module", "-n", NAMESPACE, f"--from-file=module.wasm={COUNTER}"
    )
    release.apply(counter_tenant())
    release.wait_tenant_ready("counter")
    access = release.access("counter")
    totals = [access.invoke("add", struct.pack("<q", d)) for d in (1, 2, 39)]
    assert totals == [(200, struct.pack("<q", t)) for t in (1, 3, 42)]

    snapshot = {
        "apiVersion": API_VERSION,
        "kind": "Snapshot",
        "metadata": {"name": "counter-1", "namespace": NAMESPACE},
        "spec": {"tenant": "counter"},
    }
    release.apply(snapshot)
    wait_for(
        lambda: (release.get("snapshot", "counter-1").get("status") or {}).get("phase") == "Ready",
        120,
        "the Snapshot Ready",
    )
    shard = release.get("tenant", "counter")["status"]["shard"]
    old_uid = release.get("pod", shard)["metadata"]["uid"]
    release.kubectl("delete", "pod", shard, "-n", NAMESPACE, "--wait=false")

    def replaced_and_ready() -> bool:
        pod = json.loads(
            release.kubectl("get", "pod", shard, "-n", NAMESPACE, "-o", "json", check=False) or "{}"
        )
        ready = {c["type"]: c["status"] for c in (pod.get("status") or {}).get("conditions") or []}
        return bool(pod) and pod["metadata"]["uid"] != old_uid and ready.get("Ready") == "True"

    wait_for(replaced_and_ready, 180, "the StatefulSet to bring the shard pod back Ready")
    release.wait_tenant_ready("counter")
    assert release.access("counter").invoke("add", struct.pack("<q", 0)) == (200, struct.pack("<q", 42))


def test_helm_test_invokes_a_throwaway_tenant_from_inside_the_cluster(release: DevRelease) -> None:
    out = release.helm("test", release.release, "--timeout=300s")
    phases = {line.split()[-1] for line in out.splitlines() if line.startswith("Phase:")}
    assert phases == {"Succeeded"}, out
    leftovers = release.kubectl("get", "tenants", "-n", NAMESPACE, "-o", "name")
    assert "selftest" not in leftovers, "a passed test deletes its Tenant"


def _can(release: DevRelease, account: str, *what: str) -> bool:
    out = release.kubectl(
        "auth", "can-i", *what, f"--as=system:serviceaccount:{NAMESPACE}:{account}", check=False
    )
    return out.strip() == "yes"


def test_a_shard_token_reads_only_its_namespace_and_cannot_write_tenant_specs(release: DevRelease) -> None:
    shard = "tensorwasm-shard"
    assert _can(release, shard, "get", "secrets", "-n", NAMESPACE)
    assert not _can(release, shard, "get", "secrets", "-n", "default")
    assert not _can(release, shard, "list", "secrets", "--all-namespaces")
    assert not _can(release, shard, "patch", "tenants.tensorwasm.io", "-n", NAMESPACE)
    assert not _can(release, shard, "update", "tenants.tensorwasm.io", "-n", NAMESPACE)
    assert _can(release, shard, "patch", "tenants.tensorwasm.io", "--subresource=status", "-n", NAMESPACE)
    assert not _can(release, shard, "create", "pods", "-n", NAMESPACE)


def _node_ready(release: DevRelease) -> str:
    jsonpath = '{.status.conditions[?(@.type=="Ready")].status}'
    return release.kubectl("get", "node", "tensorwasm-real", "-o", f"jsonpath={jsonpath}").strip()


def test_the_tenant_serves_through_a_kubelet_and_containerd_crash(release: DevRelease) -> None:
    """Last in this module: it kills the shared test cluster's node daemons (and restarts them)."""
    tenant = release.wait_tenant_ready("counter")
    access = release.access("counter")
    pod = release.get("pod", tenant["status"]["shard"])
    direct = TenantAccess(f"http://{pod['status']['podIP']}:8080", access.token)
    for daemon in ("kubelet", "containerd"):
        os.kill(release.plane.state().pids[daemon], signal.SIGKILL)  # type: ignore[union-attr]
        try:
            wait_for(lambda: _node_ready(release) != "True", 120, f"the node NotReady without {daemon}")
            # The shard keeps running without its node daemons (containerd-shim holds it): its pod
            # address answers. The Service does not: a NotReady node's pods leave its endpoints.
            assert direct.invoke("add", struct.pack("<q", 0)) == (200, struct.pack("<q", 42))
        finally:
            release.plane.restart(daemon)
        wait_for(lambda: _node_ready(release) == "True", 120, f"the node Ready after restarting {daemon}")
        release.wait_tenant_ready("counter")
        assert access.invoke("add", struct.pack("<q", 0)) == (200, struct.pack("<q", 42))
