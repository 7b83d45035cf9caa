"""Shared fixtures: one per real component the tests need.

- `kube`: the local control plane for the whole session (started, or reused when one is healthy),
  with its real node (TENSORWASM_TEST_REAL_NODE=0: kwok nodes only),
  with every CRD in crds/ applied and Established.
- `namespace`: a fresh namespace per test, deleted afterwards.
- `engine`: a wasmtime Engine per test module (files that need another configuration define their
  own); `stateful_module`: tests/fixtures/stateful.wat compiled by it (the snapshot tests' guest).
Tests under tests/cluster, tests/gpu and tests/e2e get their marker from their folder.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.dev.chart import DevRelease, build_image
from tensorwasm.dev.cluster import LocalControlPlane, default_state_dir
from tensorwasm.runtime.engine import CompiledModule, Engine

REPO = Path(__file__).resolve().parents[1]
FOLDER_MARKERS = {"cluster": "cluster", "gpu": "gpu", "e2e": "e2e"}


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    e = Engine()
    yield e
    e.close()


@pytest.fixture(scope="module")
def stateful_module(engine: Engine) -> CompiledModule:
    data = (Path(__file__).resolve().parent / "fixtures" / "stateful.wat").read_bytes()
    return engine.compile(data, hashlib.sha256(data).hexdigest())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(REPO / "tests").parts
        marker = FOLDER_MARKERS.get(parts[0]) if len(parts) > 1 else None
        if marker:
            item.add_marker(getattr(pytest.mark, marker))


@dataclass
class Kube:
    """Handle on the running control plane."""

    kubeconfig: Path
    server: str
    token: str
    bin_dir: Path

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        proc = self.run_kubectl(*args, input_text=input_text)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout + (proc.stderr if not check else "")

    def run_kubectl(self, *args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """kubectl with the exit code and both streams, for tests that expect a refusal."""
        return subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input_text,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    def api_client(self) -> Any:
        from kubernetes import config

        # The kubernetes package ships no type hints: call it through an explicitly Any-typed name.
        new_client: Callable[..., Any] = config.new_client_from_config
        return new_client(config_file=str(self.kubeconfig))

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.25,
    raise_on_timeout: bool = True,
) -> Any:
    """Poll `predicate` until it returns something truthy, and return that; else fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    if raise_on_timeout:
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
    return last


def apply_crds(kube: Kube) -> None:
    crds = sorted((REPO / "crds").glob("*.yaml"))
    if not crds:
        return
    args = [arg for crd in crds for arg in ("-f", str(crd))]
    kube.kubectl("apply", "--server-side", "--force-conflicts", *args)
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", *args)


def session_cluster_dir() -> Path:
    """The session's cluster: TENSORWASM_TEST_CLUSTER_DIR, or test-cluster beside the dev cluster."""
    return Path(os.environ.get("TENSORWASM_TEST_CLUSTER_DIR", default_state_dir().parent / "test-cluster"))


def real_node_release(namespace: str) -> DevRelease:
    """A DevRelease in `namespace` on the test cluster's real node with the image imported (an
    interrupted earlier run's release removed first); skips when the cluster runs without the node."""
    plane = LocalControlPlane(session_cluster_dir())
    state = plane.state()
    if state is None or state.node_slot is None:
        pytest.skip("the test cluster runs without its real node (TENSORWASM_TEST_REAL_NODE=0)")
    dev = DevRelease(plane, state, namespace)
    dev.uninstall()
    dev.prepare(build_image())
    return dev


# On a failed session the cluster's component logs (their last bytes) are kept beside the cluster's
# directory, one folder per cluster (sessions with their own TENSORWASM_TEST_CLUSTER_DIR keep theirs
# apart): the cluster itself is torn down, and CI shows only the output's tail.
KEPT_LOG_BYTES = 4 << 20


def keep_cluster_logs(cluster_dir: Path) -> Path:
    """Copy the last KEPT_LOG_BYTES of every component log under `cluster_dir` to
    `<cluster_dir>.failed-logs/` (replacing that cluster's earlier ones) and return that folder."""
    dest = cluster_dir.with_name(f"{cluster_dir.name}.failed-logs")
    if dest.exists():
        for old in dest.rglob("*.log"):
            old.unlink()
    for log in sorted(cluster_dir.rglob("*.log")):
        target = dest / log.relative_to(cluster_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        with log.open("rb") as src:
            src.seek(max(0, log.stat().st_size - KEPT_LOG_BYTES))
            target.write_bytes(src.read())
    return dest


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest) -> Iterator[Kube]:
    plane = LocalControlPlane(session_cluster_dir(), log=lambda msg: print(msg, flush=True))
    reused = plane.state() is not None and plane.status().ready
    # With the real node (containerd, kubelet, kube-proxy) unless TENSORWASM_TEST_REAL_NODE=0.
    with_real_node = os.environ.get("TENSORWASM_TEST_REAL_NODE", "1") != "0"
    state = plane.up(nodes=3, gpus_per_node=1, timeout_s=240, with_real_node=with_real_node)
    handle = Kube(Path(state.kubeconfig), state.server, state.token, Path(state.bin_dir))
    apply_crds(handle)
    yield handle
    if request.session.testsfailed:
        print(f"\nCluster logs of this failed session: {keep_cluster_logs(session_cluster_dir())}")
    if not reused and os.environ.get("TENSORWASM_KEEP_CLUSTER") != "1":
        plane.down()


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    # Unique per run: a namespace of an earlier run may still be terminating.
    digest = hashlib.sha1(f"{request.node.nodeid}{time.time_ns()}".encode()).hexdigest()[:8]
    name = f"t-{request.node.name[:40].lower().replace('_', '-').strip('-')}-{digest}"
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")
