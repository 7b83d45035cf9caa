"""The dev cluster's real node: pods run in containers with their own network namespace and address,
ClusterIP Services answer from the host through kube-proxy, a killed containerd or kubelet comes
back, and `down` after a crash leaves nothing of the node on the host.

The image is busybox-static's binary in one layer (hack/image/ociarchive.py), imported with
`tensorwasm dev cluster import-image`: no registry is reachable here.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorwasm.dev.cluster import ClusterError, ClusterState, LocalControlPlane, pid_alive
from tensorwasm.dev.node import (
    NODE_NAME,
    REAL_NODE_LABEL,
    NodeNetwork,
    NodePaths,
    claim_network,
    clean_up,
    leftovers,
)
from tests.conftest import REPO, Kube, wait_for

pytestmark = pytest.mark.node

IMAGE = "tensorwasm.io/test-httpd:1"
BUSYBOX = Path("/bin/busybox")


def tensorwasm_cluster(*args: str, state_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--dir", str(state_dir)] if state_dir else []
    return subprocess.run(
        [sys.executable, "-m", "tensorwasm.cli.main", "dev", "cluster", *args, *extra],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def httpd_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI archive whose only file is busybox: `busybox httpd` serves /www/index.html."""
    assert BUSYBOX.exists(), "busybox-static is missing: run `make deps` (hack/node/deps.sh)"
    work = tmp_path_factory.mktemp("httpd-image")
    layer = work / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        tar.add(BUSYBOX, arcname="bin/busybox")
        index = work / "index.html"
        index.write_text("served by a real pod\n")
        tar.add(index, arcname="www/index.html")
    archive = work / "httpd.oci.tar"
    entrypoint = '["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]'
    subprocess.run(
        [sys.executable, str(REPO / "hack" / "image" / "ociarchive.py"), "--name", IMAGE,
         "--layer", str(layer), "--entrypoint", entrypoint, "--out", str(archive)],
        check=True, capture_output=True,
    )  # fmt: skip
    return archive


def build_server(name: str) -> str:
    """A Deployment that only the real node accepts, and its ClusterIP Service."""
    pod_spec = {
        "nodeSelector": {REAL_NODE_LABEL: "true"},
        "tolerations": [{"key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{
            "name": "httpd", "image": IMAGE, "imagePullPolicy": "Never",
            "ports": [{"containerPort": 8080}],
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
        }],
    }  # fmt: skip
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec}},
    }  # fmt: skip
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]},
    }  # fmt: skip
    return json.dumps(deployment) + "\n---\n" + json.dumps(service)


def http_get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return str(resp.read().decode())
    except OSError:
        return ""


def ready_pod(kube: Kube, namespace: str, app: str) -> dict[str, object] | None:
    pods = json.loads(kube.kubectl("get", "pods", "-n", namespace, "-l", f"app={app}", "-o", "json"))["items"]
    for pod in pods:
        conditions = pod["status"].get("conditions", [])
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            return dict(pod)
    return None


def node_ready(kube: Kube) -> str:
    jsonpath = '{.status.conditions[?(@.type=="Ready")].status}'
    return kube.kubectl("get", "node", NODE_NAME, "-o", f"jsonpath={jsonpath}").strip()


def recorded(state_dir: Path) -> ClusterState:
    state = LocalControlPlane(state_dir, log=lambda _m: None).state()
    assert state is not None, f"no cluster recorded in {state_dir}"
    return state


def test_pod_runs_with_its_own_address_and_serves_through_a_cluster_ip(
    kube: Kube, namespace: str, httpd_image: Path
) -> None:
    state_dir = Path(kube.kubeconfig).parent
    state = recorded(state_dir)
    if state.node_network is None:
        pytest.fail(
            f"the test cluster in {state_dir} has no real node (started before it existed or with "
            f"TENSORWASM_TEST_REAL_NODE=0): `tensorwasm dev cluster down --dir {state_dir}` and run again"
        )
    net = state.node_network
    node = json.loads(kube.kubectl("get", "node", NODE_NAME, "-o", "json"))
    assert node["metadata"]["labels"][REAL_NODE_LABEL] == "true"
    assert {"key": REAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"} in node["spec"]["taints"]
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://2.")

    imported = tensorwasm_cluster("import-image", str(httpd_image), state_dir=state_dir)
    assert imported.returncode == 0, imported.stderr
    kube.kubectl("apply", "-n", namespace, "-f", "-", input_text=build_server("httpd"))
    pod = wait_for(lambda: ready_pod(kube, namespace, "httpd"), 180, "the httpd pod to become Ready")

    assert pod["spec"]["nodeName"] == NODE_NAME  # type: ignore[index]
    pod_ip = ipaddress.ip_address(pod["status"]["podIP"])  # type: ignore[index]
    assert pod_ip in ipaddress.ip_network(net.pod_cidr)  # its own namespace, on the node's bridge
    assert http_get(f"http://{pod_ip}:8080/") == "served by a real pod\n"
    cluster_ip = kube.kubectl("get", "service", "httpd", "-n", namespace, "-o", "jsonpath={.spec.clusterIP}")
    assert ipaddress.ip_address(cluster_ip) in ipaddress.ip_network(net.service_cidr)
    served = wait_for(lambda: http_get(f"http://{cluster_ip}/"), 60, "the ClusterIP Service to answer")
    assert served == "served by a real pod\n"


@pytest.fixture
def private_cluster(kube: Kube) -> Iterator[Path]:
    """A second cluster with its own real node (beside the session's: two clusters on one machine).
    In a short directory: pytest's tmp_path can be too long for the kubelet's unix sockets."""
    state_dir = Path(tempfile.mkdtemp(prefix="twc-", dir="/tmp")) / "cluster"
    up = tensorwasm_cluster("up", "--nodes", "1", state_dir=state_dir)
    assert up.returncode == 0, up.stderr
    yield state_dir
    tensorwasm_cluster("down", state_dir=state_dir)
    shutil.rmtree(state_dir.parent, ignore_errors=True)


def test_killed_node_daemons_come_back_and_down_after_a_crash_cleans_the_host(
    private_cluster: Path, httpd_image: Path, kube: Kube
) -> None:
    state_dir = private_cluster
    state = recorded(state_dir)
    net = state.node_network
    assert net is not None and net != recorded(Path(kube.kubeconfig).parent).node_network
    private = Kube(Path(state.kubeconfig), state.server, state.token, Path(state.bin_dir))
    assert tensorwasm_cluster("import-image", str(httpd_image), state_dir=state_dir).returncode == 0
    private.kubectl("apply", "-f", "-", input_text=build_server("httpd"))
    wait_for(lambda: ready_pod(private, "default", "httpd"), 180, "the httpd pod to become Ready")
    cluster_ip = private.kubectl("get", "service", "httpd", "-o", "jsonpath={.spec.clusterIP}")
    wait_for(lambda: http_get(f"http://{cluster_ip}/"), 60, "the Service to answer")

    again = tensorwasm_cluster("up", state_dir=state_dir)
    assert again.returncode == 0 and "Reused running cluster" in again.stderr

    for daemon in ("containerd", "kubelet"):
        os.kill(recorded(state_dir).pids[daemon], signal.SIGKILL)
        wait_for(lambda: node_ready(private) != "True", 120, f"the node to go NotReady without {daemon}")
        refused = tensorwasm_cluster("up", state_dir=state_dir)
        assert refused.returncode == 1 and f"stopped: {daemon}" in refused.stderr
        restarted = tensorwasm_cluster("restart", daemon, state_dir=state_dir)
        assert restarted.returncode == 0, restarted.stderr
        wait_for(
            lambda: node_ready(private) == "True", 120, f"the node to be Ready after restarting {daemon}"
        )
        wait_for(
            lambda: ready_pod(private, "default", "httpd"), 120, f"the pod Ready after {daemon} came back"
        )
        served = wait_for(
            lambda: http_get(f"http://{cluster_ip}/"), 60, f"the Service to answer after {daemon}"
        )
        assert served == "served by a real pod\n"

    # A crash: every daemon of the cluster SIGKILLed; the pod's container and shim keep running.
    state = recorded(state_dir)
    for pid in state.pids.values():
        os.kill(pid, signal.SIGKILL)
    assert leftovers(net, state.node_paths), "the node left nothing to clean: the test would prove nothing"
    down = tensorwasm_cluster("down", state_dir=state_dir)
    assert down.returncode == 0, down.stderr
    assert leftovers(net, state.node_paths) == []
    assert not any(pid_alive(pid, f"{state.bin_dir}/{name}") for name, pid in state.pids.items())
    assert http_get(f"http://{cluster_ip}/") == ""


def test_restart_refuses_what_it_cannot_restart(tmp_path: Path) -> None:
    plane = LocalControlPlane(tmp_path / "none", log=lambda _m: None)
    with pytest.raises(ClusterError, match="no cluster recorded"):
        plane.restart("kubelet")


def test_each_slot_has_its_own_names_and_ranges() -> None:
    a, b = NodeNetwork(0), NodeNetwork(1)
    for field in ("netns", "host_veth", "host_ip", "pod_cidr", "service_cidr", "cgroup"):
        assert getattr(a, field) != getattr(b, field), field
    nets = [ipaddress.ip_network(n.pod_cidr) for n in (a, b)] + [
        ipaddress.ip_network(n.service_cidr) for n in (a, b)
    ]
    assert not any(x.overlaps(y) for i, x in enumerate(nets) for y in nets[i + 1 :])


def test_down_of_a_stale_cluster_leaves_a_slot_that_another_cluster_now_owns(tmp_path: Path) -> None:
    ours, theirs = NodePaths(tmp_path / "ours" / "node"), NodePaths(tmp_path / "theirs" / "node")
    net = claim_network(theirs)
    try:
        assert clean_up(net, ours) is False  # e.g. a failed `up` whose state still names this slot
        assert leftovers(net, theirs), "the other cluster's namespace must survive"
    finally:
        assert clean_up(net, theirs) is True
    assert leftovers(net, theirs) == []
