"""SIGTERM always ends a shard within the grace period, even with a guest that never returns
(issue 13): a start function spinning under a ten-minute deadline is interrupted at the stop, and
so is an invoke spinning under one while keep-alive clients load the shard pinned to one CPU."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


def _entry(name: str, fixture: str, timeout_ms: int) -> str:
    path = FIXTURES / fixture
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return (
        f"  - {{name: {name}, token: token-{name}-0123456789, module: {{path: {path}, sha256: {digest}}},"
        f" limits: {{timeoutMs: {timeout_ms}}}}}\n"
    )


def test_sigterm_with_a_guest_stuck_in_its_start_function_exits_cleanly(tmp_path: Path) -> None:
    stuck = hashlib.sha256((FIXTURES / "start_spin.wat").read_bytes()).hexdigest()[:12]
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        "tenants:\n" + _entry("alpha", "echo.wat", 1000) + _entry("stuck", "start_spin.wat", 600_000)
    )
    cmd = [sys.executable, "-m", "tensorwasm.runtime", "--tenants-file", str(tenants),
           "--listen", "127.0.0.1:0", "--accelerator", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        # The stuck module compiled: its start function runs (or is about to) under a ten-minute deadline.
        while not any(f"Compiled module sha256={stuck}" in ln for ln in lines):
            line = proc.stderr.readline()
            assert line, "the runtime ended before loading the stuck module:\n" + "".join(lines)
            lines.append(line)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = proc.wait(25)  # under Kubernetes' default 30 s grace period
        rest = proc.stderr.read()
        assert code == 0, rest
        assert time.monotonic() - started < 25
        assert re.search(r"Runtime stopped exit_code=0", rest), rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _invoke_until(port: int, path: str, token: str, stop: threading.Event, answers: list[int]) -> None:
    """One keep-alive client invoking as fast as answers come, until `stop` or the server goes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    try:
        while not stop.is_set():
            conn.request("POST", path, body=b"hello world 1234", headers=headers)
            response = conn.getresponse()
            response.read()
            answers.append(response.status)
    except (OSError, http.client.HTTPException):
        pass  # the shard closed the connection: the stop this test is about
    finally:
        conn.close()


def _in_flight(admin_port: int, tenant: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf'tensorwasm_invocations_in_flight{{[^}}]*tenant="{tenant}"[^}}]*}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_sigterm_under_load_with_a_stuck_invoke_on_one_pinned_cpu_exits_cleanly(tmp_path: Path) -> None:
    # bench_http's pinned run: the shard on one CPU (and SCHED_RR where permitted), keep-alive
    # clients invoking flat out, and a guest spinning under a ten-minute deadline. A shutdown that
    # spins instead of blocking starves the event loop there (it took 25 s, ended by the fallback).
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        "tenants:\n" + _entry("alpha", "echo.wat", 1000) + _entry("stuck", "runaway.wat", 600_000)
    )
    cmd = [sys.executable, "-m", "tensorwasm.runtime", "--tenants-file", str(tenants),
           "--listen", "127.0.0.1:0", "--accelerator", "cpu", "--log-level", "info"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO)
    stop = threading.Event()
    answers: list[list[int]] = [[] for _ in range(8)]
    clients: list[threading.Thread] = []
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        while not (
            found := re.search(
                r"Runtime listening addr=\S+:(\d+) admin=\S+:(\d+)", lines[-1] if lines else ""
            )
        ):
            line = proc.stderr.readline()
            assert line, "the runtime ended before listening:\n" + "".join(lines)
            lines.append(line)
        port, admin_port = int(found.group(1)), int(found.group(2))
        # The rest of stderr is drained by a thread: a full pipe would block the shard's logging.
        rest: list[str] = []
        drain = threading.Thread(target=lambda: rest.extend(proc.stderr or ()), daemon=True)
        drain.start()
        wait_for(lambda: _in_flight(admin_port, "alpha") == 0 and _ready(port), 60, "tenants loaded")
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            os.sched_setaffinity(int(tid), {0})
            with contextlib.suppress(OSError):  # not permitted: the pinning alone still reproduces a spin
                os.sched_setscheduler(int(tid), os.SCHED_RR, os.sched_param(10))
        stuck = threading.Thread(
            target=_invoke_until,
            args=(port, "/v1/functions/spin/invoke", "token-stuck-0123456789", stop, []),
        )
        stuck.start()
        clients = [stuck] + [
            threading.Thread(
                target=_invoke_until,
                args=(port, "/v1/functions/echo/invoke", "token-alpha-0123456789", stop, got),
            )
            for got in answers
        ]
        for client in clients[1:]:
            client.start()
        wait_for(lambda: _in_flight(admin_port, "stuck") >= 1, 60, "the spinning invoke running")
        wait_for(lambda: sum(map(len, answers)) >= 200, 60, "echo answers under load")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(28)  # the pod's grace period is 30 s
        drain.join(10)
        log = "".join(rest)
        assert code == 0, log
        assert "Runtime stopped exit_code=0" in log, log
        assert "without a clean shutdown" not in log, log
        assert {s for got in answers for s in got} == {200}, "an echo invoke failed before the stop"
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for client in clients:
            client.join(60)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            return bool(response.status == 200)
    except OSError:
        return False
