"""Cluster fixtures of the operator: `operator_runner` runs the real `tensorwasm operator` process.

A subprocess (not in-process KopfRunner) so tests can SIGKILL it mid-reconcile and restart it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]


class OperatorProcess:
    """One `tensorwasm operator` for one namespace; restartable, killable, log kept across runs."""

    def __init__(self, kube: Any, namespace: str, log_path: Path, env: dict[str, str]) -> None:
        self.kube, self.namespace, self.log_path = kube, namespace, log_path
        self.env = {**kube.env, "TENSORWASM_OPERATOR_NAMESPACE": namespace, **env}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, **env: str) -> OperatorProcess:
        assert self.proc is None or self.proc.poll() is not None, "operator already running"
        self.env.update(env)
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"----- start {self.starts} -----\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorwasm.cli.main", "operator"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        log.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers, no graceful stop (what a node crash looks like)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def current_log(self) -> str:
        return self.log().rsplit(f"----- start {self.starts} -----", 1)[-1]

    def assert_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"operator exited; log:\n{self.log()[-4000:]}")


@pytest.fixture
def operator_runner(kube: Any, namespace: str, tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    """Factory: operator_runner(**TENSORWASM_OPERATOR_* env) starts the operator for `namespace`."""
    runners: list[OperatorProcess] = []

    def make(**env: str) -> OperatorProcess:
        full = {f"TENSORWASM_OPERATOR_{k.upper()}": v for k, v in env.items()}
        runner = OperatorProcess(kube, namespace, tmp_path / f"operator-{len(runners)}.log", full)
        runners.append(runner)
        return runner.start()

    yield make
    # Delete Tenants while the operator still runs, so the finalizer does not leave them Terminating.
    kube.kubectl("delete", "tenants", "--all", "-n", namespace, "--wait=false", check=False)
    for runner in runners:
        if runner.proc is not None and runner.proc.poll() is None:
            wait_for(
                lambda: not kube_json(kube, "get", "tenants", "-n", namespace)["items"],
                30,
                "tenants gone",
                raise_on_timeout=False,
            )
        runner.stop()


def kube_json(kube: Any, *args: str) -> Any:
    return json.loads(kube.kubectl(*args, "-o", "json"))


@pytest.fixture(autouse=True)
def _no_stray_env() -> None:
    # The operator reads TENSORWASM_OPERATOR_* from the environment; a developer's shell must not leak in.
    for key in [k for k in os.environ if k.startswith("TENSORWASM_OPERATOR_")]:
        os.environ.pop(key)


SHA = "0" * 63 + "1"


def tenant_manifest(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "module": {"url": f"https://modules.example/{name}.wasm", "sha256": SHA},
        "functions": ["echo"],
    }
    body.update(spec)
    return {
        "apiVersion": "tensorwasm.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": body,
    }


class TenantOps:
    """Tenant helpers for one namespace, all through kubectl against the real API server."""

    def __init__(self, kube: Any, namespace: str) -> None:
        self.kube, self.ns = kube, namespace

    def apply(self, *manifests: dict[str, Any]) -> None:
        doc = {"apiVersion": "v1", "kind": "List", "items": list(manifests)}
        self.kube.kubectl("apply", "-n", self.ns, "-f", "-", input_text=json.dumps(doc))

    def all(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = kube_json(self.kube, "get", "tenants", "-n", self.ns)["items"]
        return items

    def shards(self) -> dict[str, str | None]:
        return {t["metadata"]["name"]: t.get("status", {}).get("shard") for t in self.all()}

    def wait_phase(self, names: list[str], phase: str | set[str], timeout: float = 60) -> dict[str, Any]:
        want = {phase} if isinstance(phase, str) else phase

        def ready() -> dict[str, Any] | None:
            by_name = {t["metadata"]["name"]: t for t in self.all()}
            if all(by_name.get(n, {}).get("status", {}).get("phase") in want for n in names):
                return by_name
            return None

        result: dict[str, Any] = wait_for(ready, timeout, f"{len(names)} tenants in phase {want}")
        return result

    def report(
        self,
        name: str,
        shard: str,
        loaded: bool = True,
        reason: str = "ModuleLoaded",
        message: str = "",
        gpu: int = 0,
    ) -> None:
        """Write status.runtime the way a shard does (the contract's other party, through the API)."""
        gen = kube_json(self.kube, "get", "tenant", name, "-n", self.ns)["metadata"]["generation"]
        runtime = {
            "shard": shard,
            "observedGeneration": gen,
            "loaded": loaded,
            "reason": reason,
            "message": message,
            "gpuBytesInUse": gpu,
            "reportedAt": "2026-01-01T00:00:00Z",
        }
        self.kube.kubectl(
            "patch",
            "tenant",
            name,
            "-n",
            self.ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": {"runtime": runtime}}),
        )

    def owned(self, kind: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = kube_json(
            self.kube, "get", kind, "-n", self.ns, "-l", "app.kubernetes.io/managed-by=tensorwasm-operator"
        )["items"]
        return [i for i in items if "tensorwasm.io/tenant" in i["metadata"].get("labels", {})]


@pytest.fixture
def tenants(kube: Any, namespace: str) -> TenantOps:
    return TenantOps(kube, namespace)
