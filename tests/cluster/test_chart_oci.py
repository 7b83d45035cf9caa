"""`make chart-publish` pushes the chart as an OCI artifact, and Helm installs from it.

A real OCI registry (distribution's `registry`, built once by `make registry` from the Go module
proxy and cached like the control plane) on a free loopback port with its storage in a temporary
directory; the real `make chart-package` / `chart-publish` targets with helm's push; then
`helm show chart` and `helm template` straight from oci:// (what a user's `helm install oci://...`
reads) must be the repository's chart.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    built = subprocess.run(["make", "--no-print-directory", "registry"], cwd=REPO, capture_output=True,
                           text=True, timeout=3600, check=True)  # fmt: skip
    binary = Path(built.stdout.strip().splitlines()[-1]) / "registry"
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "storage")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }))  # fmt: skip
    proc = subprocess.Popen([str(binary), "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return proc.poll() is not None  # exited: stop waiting, the test then fails on push

    wait_for(up, 60, "the registry listening")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def helm(kube: Any, *args: str) -> str:
    done = subprocess.run([str(kube.bin_dir / "helm"), *args], capture_output=True, text=True, timeout=300,
                          env=kube.env, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_chart_publish_pushes_an_oci_artifact_helm_installs_from(
    kube: Any, registry: str, tmp_path: Path
) -> None:
    chart = yaml.safe_load((REPO / "helm" / "tensorwasm" / "Chart.yaml").read_text())
    started = time.monotonic()
    pushed = subprocess.run(
        ["make", "--no-print-directory", "chart-publish", f"CHART_DIST={tmp_path / 'dist'}",
         f"CHART_REGISTRY=oci://{registry}/charts", "HELM_PUSH_FLAGS=--plain-http"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    assert f"Pushed: {registry}/charts/tensorwasm:{chart['version']}" in pushed.stdout + pushed.stderr
    print(f"chart-package + chart-publish: {time.monotonic() - started:.1f} s")
    ref = f"oci://{registry}/charts/tensorwasm"
    shown = yaml.safe_load(helm(kube, "show", "chart", ref, "--version", chart["version"], "--plain-http"))
    assert (shown["name"], shown["version"], shown["appVersion"]) == (
        chart["name"], chart["version"], chart["appVersion"],
    )  # fmt: skip
    assert "TensorWasm" in helm(kube, "show", "readme", ref, "--version", chart["version"], "--plain-http")
    rendered = helm(kube, "template", "tw", ref, "--version", chart["version"], "--plain-http", "-n", "x")
    local = helm(kube, "template", "tw", str(REPO / "helm" / "tensorwasm"), "-n", "x")
    assert rendered == local  # the artifact is the repository's chart, CRD files included
