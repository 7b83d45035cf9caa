"""The chart on the real node: `helm install` -> first invoke (cold and warm), shard pod -> Ready, and
a `helm upgrade` to a new image under a client that keeps invoking (every failure counted).

Starts a cluster of its own with a real node (`~/.cache/tensorwasm/bench-chart-cluster`, removed
after). Cold: the image is not on the node yet (import included), the release is new. Warm: the
release is uninstalled and installed again with the image in place. Shard start: a shard pod is
deleted and the time until its replacement is Ready and its tenant answers is taken, 3 times. Upgrade:
`helm upgrade --set image.tag=<same image, another tag>` rolls the operator, which then rolls the
shard itself (a surge shard takes the tenant through the move barrier while the only shard pod is
replaced, docs/operator.md "Shard roll") while a thread invokes every 20 ms; 429/503 are retried after
Retry-After, and connection failures are counted separately (the roll is done when no roll
annotation is left and every shard pod is Ready on the new image).
Needs root (the real node).
"""

from __future__ import annotations

import base64
import hashlib
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from tensorwasm.api.group import API_VERSION
from tensorwasm.dev.chart import DevRelease, TenantAccess, build_image
from tensorwasm.dev.cluster import REPO_ROOT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_cluster import bench_cluster

NAMESPACE = "tw-bench-chart"
CRDS = ["true"]  # "false" on a reused cluster, whose CRDs another owner applied
ECHO = REPO_ROOT / "examples" / "modules" / "echo.wasm"


def _tenant() -> list[dict[str, Any]]:
    wasm = ECHO.read_bytes()
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "echo-module", "namespace": NAMESPACE},
         "binaryData": {"module.wasm": base64.b64encode(wasm).decode()}},
        {"apiVersion": API_VERSION, "kind": "Tenant", "metadata": {"name": "alpha", "namespace": NAMESPACE},
         "spec": {"module": {"configMapRef": {"name": "echo-module", "key": "module.wasm"},
                             "sha256": hashlib.sha256(wasm).hexdigest()},
                  "functions": ["echo"], "limits": {"linearMemory": "1Mi", "timeoutMs": 1000}}},
    ]  # fmt: skip


def _first_invoke(release: DevRelease) -> float:
    """Apply the tenant, wait until an invoke through its Service succeeds; seconds taken."""
    started = time.monotonic()
    release.apply(*_tenant())
    release.wait_tenant_ready("alpha")
    access = release.access("alpha")
    while access.invoke("echo", b"x", timeout_s=2)[0] != 200:
        time.sleep(0.05)
    return time.monotonic() - started


def _install_to_first_invoke(release: DevRelease, image: Any, cold: bool) -> dict[str, float]:
    started = time.monotonic()
    if cold:
        release.prepare(image)  # imports the image into the node
    else:
        release.prepare_storage()
    prepared = time.monotonic()
    release.install(f"crds.enabled={CRDS[0]}")
    installed = time.monotonic()
    tenant_s = _first_invoke(release)
    return {
        "prepare_s": prepared - started,
        "helm_install_s": installed - prepared,
        "tenant_to_first_invoke_s": tenant_s,
        "install_to_first_invoke_s": time.monotonic() - prepared,
    }


def _pod_ready(release: DevRelease, name: str, not_uid: str) -> bool:
    out = release.kubectl("get", "pod", name, "-n", NAMESPACE, "-o", "json", check=False)
    if not out.strip():
        return False
    pod = json.loads(out)
    conditions = {c["type"]: c["status"] for c in (pod.get("status") or {}).get("conditions") or []}
    return bool(pod["metadata"]["uid"] != not_uid and conditions.get("Ready") == "True")


def _shard_restart(release: DevRelease, access: TenantAccess) -> tuple[float, float]:
    shard = release.get("tenant", "alpha")["status"]["shard"]
    uid = release.get("pod", shard)["metadata"]["uid"]
    started = time.monotonic()
    release.kubectl("delete", "pod", shard, "-n", NAMESPACE, "--wait=false")
    while not _pod_ready(release, shard, uid):
        time.sleep(0.05)
    ready = time.monotonic() - started
    while access.invoke("echo", b"x", timeout_s=2)[0] != 200:
        time.sleep(0.05)
    return ready, time.monotonic() - started


class RetryingClient(threading.Thread):
    """Invokes every 20 ms; retries 429/503 after Retry-After; counts every outcome."""

    def __init__(self, access: TenantAccess) -> None:
        super().__init__(daemon=True)
        self.access, self.stop, self.outcomes = access, threading.Event(), Counter[str]()

    def run(self) -> None:
        while not self.stop.is_set():
            request = urllib.request.Request(
                f"{self.access.url}/v1/functions/echo/invoke", data=b"ping", method="POST",
                headers={"Authorization": f"Bearer {self.access.token}"},
            )  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    self.outcomes["ok" if response.read() == b"ping" else "wrong_body"] += 1
                    time.sleep(0.02)
            except urllib.error.HTTPError as exc:
                if exc.code in (429, 503):
                    self.outcomes[f"retried_{exc.code}"] += 1
                    time.sleep(float(exc.headers.get("Retry-After") or 1))
                else:
                    self.outcomes[f"http_{exc.code}"] += 1
            except OSError:
                self.outcomes["connection_failed"] += 1
                time.sleep(0.1)


def _image_of(release: DevRelease, pod: str) -> str:
    out = release.kubectl(
        "get", "pod", pod, "-n", NAMESPACE, "-o", "jsonpath={.spec.containers[0].image}", check=False
    )
    return out.strip()


def _rolled(release: DevRelease, ref: str) -> bool:
    """The operator's shard roll is over: no roll annotation, every shard pod Ready on `ref`."""
    sts = release.get("statefulset", "tensorwasm-shard")
    if "tensorwasm.io/roll" in (sts["metadata"].get("annotations") or {}):
        return False
    shards = [f"tensorwasm-shard-{i}" for i in range(int(sts["spec"]["replicas"]))]
    return all(_image_of(release, pod) == ref and _pod_ready(release, pod, "") for pod in shards)


def _upgrade_under_load(release: DevRelease, access: TenantAccess) -> dict[str, Any]:
    ref = "tensorwasm.io/tensorwasm:0.1.0-upgrade"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "hack" / "image" / "build.py"), "--ref", ref],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    archive = Path(next(line.split(":", 1)[1].strip() for line in lines if line.startswith("archive:")))
    release.plane.import_image(release.state, archive)
    client = RetryingClient(access)
    client.start()
    time.sleep(2)
    started = time.monotonic()
    release.install(f"crds.enabled={CRDS[0]}", "image.tag=0.1.0-upgrade")
    while not _rolled(release, ref):
        time.sleep(0.2)
    release.wait_tenant_ready("alpha")
    rolled = time.monotonic() - started
    time.sleep(2)
    client.stop.set()
    client.join()
    return {"rolled_s": rolled, **dict(client.outcomes)}


def run() -> dict[str, Any]:
    with bench_cluster("bench-chart-cluster") as (plane, state, reuse):
        CRDS[0] = "false" if reuse else "true"
        image = build_image(log=lambda m: None)
        release = DevRelease(plane, state, NAMESPACE, log=lambda m: None)
        release.uninstall()  # an interrupted run's
        cold = _install_to_first_invoke(release, image, cold=True)
        access = release.access("alpha")
        restarts = [_shard_restart(release, access) for _ in range(3)]
        upgrade = _upgrade_under_load(release, release.access("alpha"))
        release.uninstall()
        warm = _install_to_first_invoke(release, image, cold=False)
        release.uninstall()
    ready = [r for r, _ in restarts]
    serving = [s for _, s in restarts]
    figures = {
        "cold_install_to_first_invoke_s": round(cold["prepare_s"] + cold["install_to_first_invoke_s"], 1),
        "cold_image_import_s": round(cold["prepare_s"], 1),
        "warm_install_to_first_invoke_s": round(warm["install_to_first_invoke_s"], 1),
        "operator_ready_after_helm_install_s": round(warm["helm_install_s"], 1),
        "shard_pod_to_ready_p50_s": round(statistics.median(ready), 1),
        "shard_pod_to_serving_p50_s": round(statistics.median(serving), 1),
        "upgrade_rolled_s": round(upgrade["rolled_s"], 1),
        "upgrade_ok": upgrade.get("ok", 0),
        "upgrade_retried_429_503": upgrade.get("retried_429", 0) + upgrade.get("retried_503", 0),
        "upgrade_connection_failed": upgrade.get("connection_failed", 0),
        "upgrade_other_failures": sum(
            v for k, v in upgrade.items() if k.startswith("http_") or k == "wrong_body"
        ),
    }
    return {
        "title": "The chart on the real node: install to first invoke, shard restarts, upgrade under load",
        "figures": figures,
        "targets": {"upgrade_other_failures": "== 0", "upgrade_connection_failed": "== 0"},
        "notes": __doc__.split("\n\n", 1)[1].replace("\n", " ")
        + (f" This run: on the running cluster in {reuse} (TENSORWASM_BENCH_CLUSTER_DIR)." if reuse else "")
        + f" Restarts (ready, serving): {restarts}.",
    }
