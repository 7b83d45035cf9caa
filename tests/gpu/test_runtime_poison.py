"""The real runtime with --accelerator cuda exits with code 3 once a tenant kernel poisons the context.

A tenant's PTX kernel stores to address 16 (CUDA_ERROR_ILLEGAL_ADDRESS, a sticky error). The invoke
that hit it must answer `accelerator_failed`, /readyz must stop answering 200 (503 naming the poisoned
context while the server is still up), and the process must end with exit code 3 so Kubernetes
restarts the pod, instead of serving errors forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
TOKEN = "poison-token-0123456789"
EXIT_ACCELERATOR = 3
ACCELERATOR = "cuda"


def _get(url: str, data: bytes | None = None, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _start(tmp_path: Path) -> tuple[subprocess.Popen[str], str, list[str]]:
    module = HERE / "poison_invoke.wat"
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        "tenants:\n"
        "  - name: evil\n"
        f"    token: {TOKEN}\n"
        f"    module: {{path: {module}, sha256: {hashlib.sha256(module.read_bytes()).hexdigest()}}}\n"
        "    functions: [poke]\n"
        "    limits: {gpuMemory: 64Mi}\n"
        f"    kernels: [{{name: poke, path: {HERE / 'poison_tenant.ptx'}}}]\n"
    )
    cmd = [
        sys.executable, "-m", "tensorwasm.runtime", "--tenants-file", str(tenants),
        "--listen", "127.0.0.1:0", "--accelerator", ACCELERATOR, "--cache-dir", str(tmp_path / "cache"),
        "--health-interval", "30",  # a long period: the invoke's failure must trigger the check itself
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    found = threading.Event()
    addr: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"Runtime listening addr=(\S+?):(\d+)", line)
            if m and not addr:
                addr.append(f"http://{m.group(1)}:{m.group(2)}")
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(90):
        proc.kill()
        pytest.fail("runtime did not start:\n" + "".join(lines[-40:]))
    return proc, addr[0], lines


def test_poisoned_accelerator_fails_readiness_and_exits_3(tmp_path: Path) -> None:
    proc, base, lines = _start(tmp_path)
    try:
        deadline = time.monotonic() + 60
        while _get(f"{base}/readyz")[0] != 200:
            assert time.monotonic() < deadline, "never ready:\n" + "".join(lines[-40:])
            time.sleep(0.05)
        status, body = _get(f"{base}/v1/functions/poke/invoke", data=b"x", token=TOKEN)
        print("invoke:", status, body[:300])
        assert status == 503, body
        assert json.loads(body)["error"]["kind"] == "accelerator_failed"
        assert b"ILLEGAL_ADDRESS" in body
        # From here on the shard must never look ready again, until it is gone.
        ready_answers = []
        while proc.poll() is None:
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):  # shutting down
                ready_answers.append(_get(f"{base}/readyz"))
            time.sleep(0.01)
            if len(ready_answers) > 3000:
                break
        print("readyz after the fault:", [(s, b[:120]) for s, b in ready_answers[:3]], len(ready_answers))
        assert all(s == 503 for s, _ in ready_answers), ready_answers[:5]
        # The serving port says only "not ready" (the reason is on the admin listener and in the log).
        assert all(json.loads(b).get("ready") is False for _, b in ready_answers), ready_answers[:5]
        assert proc.wait(timeout=60) == EXIT_ACCELERATOR, "".join(lines[-40:])
        assert any("Accelerator poisoned" in ln for ln in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
