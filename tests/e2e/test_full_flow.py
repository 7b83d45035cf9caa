"""The whole product on the real control plane: operator + two runtime shard processes.

What a user does and sees: apply Tenants, they become Ready on shards, functions answer over HTTP
with each tenant's token (and refuse another tenant's), a Snapshot is captured into the store and
removed with its resource, and deleting a Tenant removes everything it owned.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys

from tensorwasm.dev.stack import LocalStack, error_kind, invoke
from tests.conftest import Kube, wait_for
from tests.e2e.conftest import apply_module, get


def tenant(name: str, module: str, sha: str, functions: list[str]) -> str:
    return json.dumps({
        "apiVersion": "tensorwasm.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {
            "module": {"configMapRef": {"name": f"{module}-module", "key": "module.wasm"}, "sha256": sha},
            "functions": functions,
            "limits": {"gpuMemory": "64Mi", "linearMemory": "4Mi", "maxConcurrency": 2},
        },
    })  # fmt: skip


def access(kube: Kube, namespace: str, stack: LocalStack, name: str) -> tuple[int, str]:
    obj = get(kube, namespace, "tenant", name)
    secret = get(kube, namespace, "secret", f"tw-{name}-token")
    return stack.shard_port(obj["status"]["shard"]), base64.b64decode(secret["data"]["token"]).decode()


def test_tenants_invoke_snapshot_and_cleanup(kube: Kube, namespace: str, stack: LocalStack) -> None:
    echo_sha, sum_sha = apply_module(kube, namespace, "echo"), apply_module(kube, namespace, "sum")
    for name, module, sha, fns in [
        ("alpha", "echo", echo_sha, ["echo"]),
        ("beta", "sum", sum_sha, ["sum"]),
        ("gamma", "echo", echo_sha, ["echo"]),
    ]:
        kube.kubectl("apply", "-n", namespace, "-f", "-", input_text=tenant(name, module, sha, fns))

    def all_ready() -> list[str]:
        stack.check_alive()
        items = get(kube, namespace, "tenants")["items"]
        ready = [t["metadata"]["name"] for t in items if t.get("status", {}).get("phase") == "Ready"]
        return sorted(ready) if len(ready) == 3 else []

    assert wait_for(all_ready, 90, "three Ready tenants") == ["alpha", "beta", "gamma"]
    table = kube.kubectl("get", "tenants", "-n", namespace)
    assert table.split("\n")[0].split() == ["NAME", "PHASE", "SHARD", "GPU-CAP", "GPU-USED", "READY", "AGE"]
    shards = {get(kube, namespace, "tenant", n)["status"]["shard"] for n in ("alpha", "beta", "gamma")}
    assert shards <= {"tensorwasm-shard-0", "tensorwasm-shard-1"}

    alpha_port, alpha_token = access(kube, namespace, stack, "alpha")
    beta_port, beta_token = access(kube, namespace, stack, "beta")
    assert invoke(alpha_port, alpha_token, "echo", b"ping") == (200, b"ping")
    numbers = (7).to_bytes(4, "little") + (35).to_bytes(4, "little")
    status, body = invoke(beta_port, beta_token, "sum", numbers)
    assert (status, int.from_bytes(body, "little", signed=True)) == (200, 42)
    status, body = invoke(beta_port, alpha_token, "sum", numbers, tenant="beta")
    assert (status, error_kind(body)) == (403, "forbidden")

    snapshot = {"apiVersion": "tensorwasm.io/v1alpha1", "kind": "Snapshot",
                "metadata": {"name": "alpha-1"}, "spec": {"tenant": "alpha"}}  # fmt: skip
    kube.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(snapshot))
    status_of = lambda: get(kube, namespace, "snapshot", "alpha-1").get("status", {})  # noqa: E731
    snap = wait_for(
        lambda: status_of() if status_of().get("phase") == "Ready" else None, 60, "Ready snapshot"
    )
    assert snap["sizeBytes"] >= 65536 and 0 < snap["storedBytes"] < snap["sizeBytes"]
    blobs = list(stack.snapshot_dir.rglob("*.twsnap"))
    assert len(blobs) == 1
    inspect = subprocess.run(
        [sys.executable, "-m", "tensorwasm.cli.main", "snapshot", "inspect", str(blobs[0])],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert inspect.returncode == 0 and "tenant       alpha" in inspect.stdout

    kube.kubectl("delete", "snapshot", "alpha-1", "-n", namespace, "--timeout=60s")
    assert not list(stack.snapshot_dir.rglob("*.twsnap")), "deleting the Snapshot removes its blob"

    kube.kubectl("delete", "tenant", "alpha", "-n", namespace, "--timeout=60s")

    def owned_gone() -> bool:
        svc = kube.run_kubectl("get", "service", "tw-alpha", "-n", namespace)
        secret = kube.run_kubectl("get", "secret", "tw-alpha-token", "-n", namespace)
        return svc.returncode != 0 and secret.returncode != 0

    assert wait_for(owned_gone, 60, "the tenant's Service and Secret to be garbage-collected")
    assert wait_for(lambda: invoke(alpha_port, alpha_token, "echo", b"x")[0] == 401, 30, "alpha unloaded")
    assert invoke(beta_port, beta_token, "sum", numbers)[0] == 200, "other tenants keep serving"
