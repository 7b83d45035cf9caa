"""A local TensorWasm stack on a running control plane: the operator and N runtime shards as
processes, standing in for the operator Deployment and the shard StatefulSet's pods.

Owns starting, finding and stopping those processes (the demo and the e2e tests share it).
kwok makes the shard pods Running but runs no container: the shard processes here are the real
runtime, named after the pods (`<shard-name>-<ordinal>`), watching the same namespace.
Must not import the runtime or kopf in-process: everything runs as its own process.
"""

from __future__ import annotations

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
    processes: dict[str, ManagedProcess] = field(default_factory=dict)

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
        self.start_operator()
        for ordinal in range(self.shards):
            self.start_shard(ordinal, timeout_s=timeout_s)
        return self

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
