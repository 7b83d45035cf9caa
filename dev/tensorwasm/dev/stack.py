"""A local TensorWasm stack on a running control plane: the operator and N runtime shards as
processes, standing in for the operator Deployment and the shard StatefulSet's pods.

Owns starting, finding and stopping those processes (the demo and the e2e tests share it).
kwok makes the shard pods Running but runs no container: the shard processes here are the real
runtime, named after the pods (`<shard-name>-<ordinal>`), watching the same namespace.
Like the Helm chart, it also installs the namespace's finalizer MutatingAdmissionPolicy (and
removes it on stop), so the operator meets new Tenants with their finalizer already there.
Must not import the runtime or kopf in-process: everything runs as its own process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tensorwasm.api.group import API_VERSION as TENANT_API_VERSION
from tensorwasm.api.group import FINALIZER
from tensorwasm.operator.desired.admission import (
    build_finalizer_binding,
    build_finalizer_policy,
    finalizer_policy_name,
)

LISTENING = re.compile(r"Runtime listening addr=127\.0\.0\.1:(\d+)")


class StackError(Exception):
    """A process of the local stack failed to start or to converge."""


@dataclass
class ManagedProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])


def _pump(stream: IO[bytes], log_path: Path, on_line: Callable[[str], None]) -> None:
    with log_path.open("ab") as log:
        for raw in iter(stream.readline, b""):
            log.write(raw)
            log.flush()
            on_line(raw.decode(errors="replace"))


@dataclass
class LocalStack:
    """The operator plus `shards` runtime shard processes for one namespace."""

    kubeconfig: Path
    namespace: str
    workdir: Path
    shards: int = 2
    shard_name: str = "tensorwasm-shard"
    accelerator: str = "cpu"
    operator_env: Mapping[str, str] = field(default_factory=dict)
    # Install the finalizer MutatingAdmissionPolicy as the chart does (False: the operator adds
    # the finalizer itself, one more write per Tenant).
    finalizer_policy: bool = True
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    # True once the policy is installed and seen to act (False where the API server lacks it).
    finalizer_policy_active: bool = False

    @property
    def snapshot_dir(self) -> Path:
        # One directory for all shards, as one ReadWriteMany volume would be: a moved tenant's
        # snapshot is readable by its new shard.
        return self.workdir / "snapshots"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORWASM_")}
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, timeout_s: float = 60.0) -> LocalStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.finalizer_policy:
            self.install_finalizer_policy(timeout_s=timeout_s)
        self.start_operator()
        for ordinal in range(self.shards):
            self.start_shard(ordinal, timeout_s=timeout_s)
        return self

    def _api(self) -> Any:
        from kubernetes import config as untyped_config

        config: Any = untyped_config  # the client ships no type hints
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def install_finalizer_policy(self, timeout_s: float = 60.0) -> bool:
        """Server-side apply the policy and its binding for this namespace, then wait until a
        dry-run Tenant create comes back with the finalizer (a new policy takes a moment to reach
        the admission chain). False, with nothing installed, where the API server does not serve
        MutatingAdmissionPolicy: the operator adds the finalizer itself there."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = self._api()
        admission = client.AdmissionregistrationV1Api(api)
        policy, binding = build_finalizer_policy(self.namespace), build_finalizer_binding(self.namespace)
        apply: dict[str, Any] = {"field_manager": "tensorwasm-dev-stack", "force": True,
                 "_content_type": "application/apply-patch+yaml"}  # fmt: skip
        try:
            admission.patch_mutating_admission_policy(policy["metadata"]["name"], policy, **apply)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        admission.patch_mutating_admission_policy_binding(binding["metadata"]["name"], binding, **apply)
        group, version = TENANT_API_VERSION.split("/")
        probe = {
            "apiVersion": TENANT_API_VERSION,
            "kind": "Tenant",
            "metadata": {"generateName": "finalizer-probe-"},
            "spec": {
                "module": {"url": "https://modules.invalid/probe.wasm", "sha256": "0" * 64},
                "functions": ["probe"],
            },
        }
        custom = client.CustomObjectsApi(api)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                created: Any = custom.create_namespaced_custom_object(
                    group, version, self.namespace, "tenants", probe, dry_run="All"
                )
            except ApiException as exc:
                # A just-created CRD or policy is not in every admission and handler chain at once:
                # the API server answers 503 "Kind=Tenant not found" (or 404) for a moment.
                if exc.status not in (404, 503) or time.monotonic() > deadline:
                    raise
                created = {}
            if FINALIZER in (created.get("metadata", {}).get("finalizers") or []):
                self.finalizer_policy_active = True
                return True
            if time.monotonic() > deadline:
                raise StackError(
                    f"the finalizer policy for namespace {self.namespace} did not take effect in {timeout_s}s"
                )
            time.sleep(0.2)

    def remove_finalizer_policy(self) -> None:
        """Best effort (the API server may be gone): a policy left behind matches only this namespace."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        admission = client.AdmissionregistrationV1Api(self._api())
        name = finalizer_policy_name(self.namespace)
        for delete in (
            admission.delete_mutating_admission_policy_binding,
            admission.delete_mutating_admission_policy,
        ):
            with contextlib.suppress(ApiException, HTTPError, OSError):
                delete(name)
        self.finalizer_policy_active = False

    def start_operator(self) -> ManagedProcess:
        env = self._env()
        env.update({
            "TENSORWASM_OPERATOR_NAMESPACE": self.namespace,
            "TENSORWASM_OPERATOR_SHARDS": str(self.shards),
            "TENSORWASM_OPERATOR_SHARD_NAME": self.shard_name,
            **self.operator_env,
        })  # fmt: skip
        log_path = self.workdir / "operator.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tensorwasm.cli.main", "operator"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        managed = ManagedProcess("operator", proc, log_path)
        self.processes["operator"] = managed
        return managed

    def start_shard(self, ordinal: int, timeout_s: float = 60.0) -> ManagedProcess:
        name = f"{self.shard_name}-{ordinal}"
        cmd = [
            sys.executable, "-m", "tensorwasm.runtime",
            "--kubeconfig", str(self.kubeconfig), "--namespace", self.namespace,
            "--shard-name", name, "--listen", "127.0.0.1:0", "--accelerator", self.accelerator,
            "--cache-dir", str(self.workdir / "module-cache"), "--snapshot-dir", str(self.snapshot_dir),
            "--resync", "10",
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, env=self._env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        managed = ManagedProcess(name, proc, self.workdir / f"{name}.log")
        found = threading.Event()

        def on_line(line: str) -> None:
            match = LISTENING.search(line)
            if match and not found.is_set():
                managed.port = int(match.group(1))
                found.set()

        assert proc.stderr is not None
        threading.Thread(target=_pump, args=(proc.stderr, managed.log_path, on_line), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not found.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise StackError(f"shard {name} did not start listening; log:\n{managed.log_tail()}")
        self.processes[name] = managed
        return managed

    def shard_port(self, shard: str) -> int:
        managed = self.processes.get(shard)
        if managed is None or not managed.port:
            raise StackError(f"no local process for shard {shard!r}")
        return managed.port

    def stop(self) -> None:
        # Shards first: the operator must still run to see the Tenants' final state.
        for name in sorted(self.processes, key=lambda n: n == "operator"):
            self.processes[name].stop()
        if self.finalizer_policy:
            self.remove_finalizer_policy()

    def check_alive(self) -> None:
        dead = [p for p in self.processes.values() if not p.alive()]
        if dead:
            raise StackError(
                "; ".join(f"{p.name} exited with {p.proc.returncode}:\n{p.log_tail()}" for p in dead)
            )


def invoke(
    port: int, token: str, function: str, payload: bytes, tenant: str | None = None, timeout_s: float = 10.0
) -> tuple[int, bytes]:
    """POST .../functions/{function}/invoke on a shard; returns (HTTP status, body).

    Without `tenant` the token picks the tenant; with it, the path names the tenant and a token
    of another tenant is refused.
    """
    prefix = f"/v1/tenants/{tenant}" if tenant else "/v1"
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{prefix}/functions/{function}/invoke",
        data=payload,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def error_kind(body: bytes) -> str:
    try:
        parsed: Any = json.loads(body)
        return str(parsed["error"]["kind"])
    except (ValueError, KeyError, TypeError):
        return ""
