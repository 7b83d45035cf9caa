"""SIGTERM always ends a shard within the grace period, even with a guest that never returns
(issue 13): a start function spinning under a ten-minute deadline is interrupted at the stop."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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
