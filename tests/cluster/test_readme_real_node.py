"""The README's "Using it" commands, run as written by bash on the dev cluster's real node.

The block is read from README.md at test time, so a README edit is tested as it stands. Exactly
three substitutions, each one a dev-cluster fact: `<registry>/tensorwasm` becomes the image
imported into the node (no registry), the `helm install` line gets the dev cluster's values file
(real-node selector, the local snapshot volume) and `crds.enabled=false` (the test session applied
the CRDs; Helm will not adopt them: docs/helm.md, CRD ownership), and the Service's DNS name becomes
its ClusterIP (the dev cluster runs no cluster DNS). Everything else, namespace included, runs
literally until the Tenant is Ready and the curl answers; then it is uninstalled in the documented
order and nothing of the release is left.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tensorwasm.dev.chart import DEV_VALUES, DevRelease, build_image
from tensorwasm.dev.cluster import LocalControlPlane
from tests.conftest import REPO, Kube, session_cluster_dir, wait_for

pytestmark = pytest.mark.node

NAMESPACE = "tensorwasm"  # the README's


def using_it() -> list[str]:
    """The command lines of README's first bash block under "## Using it"."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Using it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's Using it has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def service_ip(kube: Kube, name: str) -> str:
    svc = json.loads(kube.kubectl("get", "service", name, "-n", NAMESPACE, "-o", "json"))
    return str(svc["spec"]["clusterIP"])


def test_readme_using_it_runs_as_written_until_the_curl_answers(kube: Kube) -> None:
    plane = LocalControlPlane(session_cluster_dir())
    state = plane.state()
    if state is None or state.node_slot is None:
        pytest.skip("the test cluster runs without its real node (TENSORWASM_TEST_REAL_NODE=0)")
    dev = DevRelease(plane, state, NAMESPACE)
    dev.uninstall()  # an interrupted earlier run's
    image = build_image()
    plane.import_image(state, image.archive)
    repository, tag = image.ref.rsplit(":", 1)

    lines = using_it()
    assert lines[0] == f"kubectl create namespace {NAMESPACE}"
    install = [i for i, line in enumerate(lines) if line.startswith("helm install ")]
    assert len(install) == 1 and "<registry>/tensorwasm" in lines[install[0]]
    lines[install[0]] = lines[install[0]].split("#")[0].replace("<registry>/tensorwasm", repository) + (
        f" --set image.tag={tag} -f {DEV_VALUES} --set crds.enabled=false --timeout 300s --wait"
    )
    host = f"tw-alpha.{NAMESPACE}.svc"
    curls = [i for i, line in enumerate(lines) if line.startswith("curl ")]
    assert curls and all(host in lines[i] for i in curls)
    env = {**kube.env, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{kube.env['PATH']}"}

    def run(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=900,
        )  # fmt: skip

    try:
        # The namespace lines, then the snapshot claim's local volume (a dev-cluster fact), then
        # every line as written up to the first curl.
        namespace_lines = ("kubectl create namespace", "kubectl label namespace")
        head = [line for line in lines if line.startswith(namespace_lines)]
        done = run("\n".join(head))
        assert done.returncode == 0, done.stderr
        dev.prepare_storage()
        before = [line for line in lines[: curls[0]] if line not in head]
        done = run("\n".join(before))
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
        assert re.search(r"^alpha\s+Ready\s", done.stdout, re.M), done.stdout  # kubectl get tenants
        token = [line for line in before if line.startswith("TOKEN=")]
        ip = service_ip(kube, "tw-alpha")
        rest = [line.replace(host, ip) for line in lines[curls[0] :]]

        last_failure = [""]

        def answered() -> str | None:
            out = run("\n".join([*token, rest[0]]))
            if out.returncode != 0:
                last_failure[0] = f"exit {out.returncode}: {out.stderr[-500:]}"
            return out.stdout if out.returncode == 0 else None

        # kube-proxy programs a new ClusterIP a moment after the Service exists.
        got = wait_for(answered, 120, "the README's first curl answered", raise_on_timeout=False)
        if got is None:
            seen = kube.kubectl("get", "pods,endpointslices,services", "-n", NAMESPACE, "-o", "wide")
            events = kube.kubectl("get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp")
            why = f"the README's first curl never answered in 120 s ({last_failure[0]})"
            pytest.fail(f"{why}\n{seen}\n{events[-3000:]}")
        assert got == "hello"
        done = run("\n".join([*token, *rest]))
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
        assert "Recommended SKU:" in done.stdout  # tensorwasm plan, the last line
    finally:
        # The documented order (docs/helm.md "Uninstall"): Tenants first, then the release.
        dev.uninstall()
    pods = kube.kubectl("get", "pods", "-n", NAMESPACE, "--ignore-not-found", "-o", "name")
    assert pods.strip() == ""
    wait_for(
        lambda: not kube.kubectl("get", "namespace", NAMESPACE, "--ignore-not-found", "-o", "name").strip(),
        180,
        "the namespace gone (nothing left Terminating)",
    )
