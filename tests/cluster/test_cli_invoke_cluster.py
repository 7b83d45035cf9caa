"""The client and signed snapshots on the real node, as a user runs them: the chart installed with
`shard.snapshots.signing` (mode require, a key Secret), `tensorwasm invoke` and `kubectl tensorwasm
invoke` reading the token from the Tenant's Secret through the kubeconfig and reaching the tenant
through its Service's ClusterIP and through a kubectl port-forward, and a Snapshot captured by a
real shard pod that `tensorwasm snapshot inspect` verifies with the Secret's key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.api.group import API_VERSION
from tensorwasm.dev.chart import DevRelease
from tests.conftest import REPO, Kube, real_node_release, wait_for

# The module's setup builds the image when the tree changed (minutes on a busy two-core machine).
pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]

NAMESPACE = "tw-client-signing"
ECHO = REPO / "examples" / "modules" / "echo.wasm"
KEY_ID, KEY = "k1", hashlib.sha256(b"tw-client-signing test key").digest()
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def release(kube: Kube) -> Iterator[DevRelease]:
    dev = real_node_release(NAMESPACE)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "tw-snapshot-keys", "namespace": NAMESPACE},
        "data": {
            KEY_ID: base64.b64encode(KEY).decode(),
            "active": base64.b64encode(KEY_ID.encode()).decode(),
        },
    }
    dev.apply(secret)
    dev.install(
        "crds.enabled=false",
        "shard.snapshots.signing.mode=require",
        "shard.snapshots.signing.existingSecret=tw-snapshot-keys",
    )
    dev.kubectl("create", "configmap", "echo-module", "-n", NAMESPACE, f"--from-file=module.wasm={ECHO}")
    dev.apply(echo_tenant())
    dev.wait_tenant_ready("echo")
    yield dev
    dev.uninstall()


def echo_tenant() -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Tenant",
        "metadata": {"name": "echo", "namespace": NAMESPACE},
        "spec": {
            "module": {
                "configMapRef": {"name": "echo-module", "key": "module.wasm"},
                "sha256": hashlib.sha256(ECHO.read_bytes()).hexdigest(),
            },
            "functions": ["echo"],
            "limits": {"gpuMemory": "4Mi", "linearMemory": "1Mi", "timeoutMs": 1000},
        },
    }


def client(release: DevRelease, *args: str, exe: str = "tensorwasm") -> subprocess.CompletedProcess[bytes]:
    """The installed console script with only the kubeconfig in its environment (no token, no URL)."""
    env = {k: v for k, v in os.environ.items() if k != "TENSORWASM_TOKEN"}
    env["KUBECONFIG"] = release.state.kubeconfig
    env["PATH"] = f"{BIN}{os.pathsep}{release.bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [exe if os.sep in exe else str(BIN / exe), *args], capture_output=True, env=env, timeout=180
    )


def test_invoke_reads_the_token_through_the_kubeconfig_and_reaches_the_service(release: DevRelease) -> None:
    done = client(release, "invoke", "-n", NAMESPACE, "echo", "echo", "-d", "through the ClusterIP")
    assert (done.returncode, done.stdout) == (0, b"through the ClusterIP"), done.stderr
    load = client(
        release, "invoke", "-n", NAMESPACE, "echo", "echo", "-d", "x", "--repeat", "40", "--concurrency", "4"
    )
    assert load.returncode == 0, load.stderr
    assert (
        re.search(rb"^outcomes\s+200: 40$", load.stdout, re.M) and b"via Service tw-echo at " in load.stderr
    )


def test_invoke_port_forwards_through_the_api_server_when_asked(release: DevRelease) -> None:
    done = client(
        release, "invoke", "-n", NAMESPACE, "echo", "echo", "-d", "through a port-forward",
        "--connect", "port-forward", "--kubectl", str(release.bin_dir / "kubectl"),
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, b"through a port-forward"), done.stderr


def test_kubectl_runs_the_plugin(release: DevRelease) -> None:
    done = client(release, "tensorwasm", "invoke", "-n", NAMESPACE, "echo", "echo", "-d", "plugin",
                  exe=str(release.bin_dir / "kubectl"))  # fmt: skip
    assert (done.returncode, done.stdout) == (0, b"plugin"), done.stderr
    missing = client(release, "tensorwasm", "invoke", "-n", NAMESPACE, "nobody", "echo",
                     exe=str(release.bin_dir / "kubectl"))  # fmt: skip
    assert missing.returncode == 1 and b"Tenant tw-client-signing/nobody not found" in missing.stderr


def test_a_shard_in_require_mode_signs_its_captures_with_the_secrets_active_key(
    release: DevRelease, tmp_path: Path
) -> None:
    shard = release.get("tenant", "echo")["status"]["shard"]
    args = release.get("pod", shard)["spec"]["containers"][0]["args"]
    assert "--snapshot-signing=require" in args
    release.apply({
        "apiVersion": API_VERSION, "kind": "Snapshot",
        "metadata": {"name": "echo-signed", "namespace": NAMESPACE}, "spec": {"tenant": "echo"},
    })  # fmt: skip
    status = wait_for(
        lambda: (
            (s := release.get("snapshot", "echo-signed").get("status") or {}).get("phase")
            in ("Ready", "Failed")
            and s
        ),
        120,
        "the Snapshot captured",
    )
    assert status["phase"] == "Ready", status
    blob = release.volume_dir / "tenants" / status["tenantUid"] / f"{status['checksum']}.twsnap"
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / KEY_ID).write_bytes(KEY)
    done = subprocess.run(
        [str(BIN / "tensorwasm"), "snapshot", "inspect", str(blob), "--signing-keys", str(keys)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "signature    signed with key 'k1', verified" in done.stdout and "(format v2," in done.stdout
    doc = json.loads(
        subprocess.run(
            [str(BIN / "tensorwasm"), "snapshot", "inspect", str(blob), "--json"],
            capture_output=True,
            timeout=60,
        ).stdout
    )
    assert doc["signature"]["key_id"] == KEY_ID
