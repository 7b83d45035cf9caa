"""Runtime settings: flags beat TENSORWASM_RUNTIME_* variables beat defaults; bad values fail fast by name.

Also the process itself: `tensorwasm runtime` with bad settings exits 2 with the message, and with a
tenants file it serves, becomes ready, and exits 0 on SIGTERM.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tensorwasm.runtime.settings import SettingsError, load_settings
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
TENANTS = REPO / "examples" / "tenants.yaml"


def test_defaults_with_a_tenants_file() -> None:
    s = load_settings(["--tenants-file", str(TENANTS)], {})
    assert (s.host, s.port, s.source, s.accelerator) == ("0.0.0.0", 8080, "file", "auto")


def test_flag_beats_environment_beats_default() -> None:
    env = {
        "TENSORWASM_RUNTIME_LISTEN": "127.0.0.1:9000",
        "TENSORWASM_RUNTIME_ACCELERATOR": "cpu",
        "TENSORWASM_RUNTIME_TENANTS_FILE": str(TENANTS),
        "TENSORWASM_RUNTIME_FETCH_TIMEOUT": "5",
    }
    s = load_settings(["--listen", "[::1]:0"], env)
    assert (s.host, s.port) == ("::1", 0)
    assert s.accelerator == "cpu" and s.fetch_timeout_s == 5.0 and s.tenants_file == TENANTS


def test_kube_source_takes_the_shard_name_from_hostname() -> None:
    s = load_settings(["--namespace", "tw"], {"HOSTNAME": "tensorwasm-shard-2"})
    assert s.source == "kube" and s.shard_name == "tensorwasm-shard-2" and s.namespace == "tw"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--listen", "8080"], {}, r"--listen: expected HOST:PORT"),
        ([], {"TENSORWASM_RUNTIME_LISTEN": "x:99999"}, r"TENSORWASM_RUNTIME_LISTEN: expected HOST:PORT"),
        (["--accelerator", "tpu"], {}, r"--accelerator: expected one of auto, cuda, cpu"),
        (["--fetch-timeout", "soon"], {}, r"--fetch-timeout: expected a number"),
        (["--max-module-bytes", "12"], {}, r"--max-module-bytes: 12 is outside"),
        (["--gil-switch-ms", "0"], {}, r"--gil-switch-ms: 0.0 is outside \[0.05, 100\]"),
        (
            [],
            {"TENSORWASM_RUNTIME_GIL_SWITCH_MS": "fast"},
            r"TENSORWASM_RUNTIME_GIL_SWITCH_MS: expected a number",
        ),
        (
            [],
            {"TENSORWASM_RUNTIME_MPS_START": "maybe"},
            r"TENSORWASM_RUNTIME_MPS_START: expected true or false",
        ),
        (
            ["--tenants-file", "/nonexistent.yaml"],
            {},
            r"--tenants-file: /nonexistent.yaml is not a readable file",
        ),
        ([], {}, r"no tenant source: pass --tenants-file PATH .* or --shard-name NAME"),
        (["--shard-name", "s0", "--kubeconfig", "/nope"], {}, r"--kubeconfig: /nope is not a readable file"),
    ],
)
def test_bad_settings_name_the_flag_or_variable(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(argv, env)


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tensorwasm.cli.main", "runtime", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)  # fmt: skip


def test_cli_refuses_bad_settings_with_exit_2() -> None:
    proc = run_cli("--tenants-file", str(TENANTS), "--listen", "nowhere")
    assert proc.returncode == 2
    assert "tensorwasm runtime: --listen: expected HOST:PORT" in proc.stderr


def test_cli_refuses_a_broken_tenants_file(tmp_path: Path) -> None:
    bad = tmp_path / "tenants.yaml"
    bad.write_text("tenants: [ {name: a}, {name: a} ]\n")
    proc = run_cli("--tenants-file", str(bad), "--accelerator", "cpu")
    assert proc.returncode == 2
    assert "tenant 'a' is listed twice" in proc.stderr


def test_cli_serves_the_tenants_file_and_stops_cleanly_on_sigterm() -> None:
    cmd = [sys.executable, "-m", "tensorwasm.cli.main", "runtime", "--tenants-file", str(TENANTS),
           "--listen", "127.0.0.1:0", "--accelerator", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            m = re.search(
                r"Runtime listening addr=127\.0\.0\.1:(\d+) admin=127\.0\.0\.1:(\d+)", proc.stderr.readline()
            )
            port, admin = (int(m.group(1)), int(m.group(2))) if m else (None, None)
        assert port, "the runtime did not log its address"

        def readyz() -> dict[str, object] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5) as resp:
                    return dict(json.load(resp))
            except OSError:  # 503 while loading, or not accepting yet
                return None

        # Loads run on their own: wait for readiness, not for time.
        ready = wait_for(readyz, 120, "the runtime ready", interval=0.05)
        assert ready["ready"] and ready["loaded"] == ["alpha", "beta", "gamma", "runaway"]
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/functions/echo/invoke", data=b"ping",
            headers={"Authorization": "Bearer demo-token-alpha-0001"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.read() == b"ping"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_a_tenants_file_that_is_not_text_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "tenants.yaml"
    bad.write_bytes(b"tenants:\n  - name: \xff\xfe\n")
    proc = run_cli("--tenants-file", str(bad), "--accelerator", "cpu")
    assert proc.returncode == 2, proc.stderr
    assert "not UTF-8 text" in proc.stderr and "Traceback" not in proc.stderr
