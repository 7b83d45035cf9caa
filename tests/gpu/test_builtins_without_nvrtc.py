"""A shard image carries no NVRTC (the NVIDIA container runtime mounts only the driver): the built-in
kernels then come from the shipped PTX (accel/builtins_ptx.py), and they must agree with the CPU oracle
exactly as the NVRTC-compiled ones do. Runs the kernel agreement tests again in a child process whose
NVRTC is hidden, so this process's own accelerator is untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.gpu.conftest import HIDE_NVRTC

ROOT = Path(__file__).resolve().parents[2]


def test_builtins_linked_from_the_shipped_ptx_agree_with_cpu() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "log_cli=true",
         "--log-cli-level=INFO", "tests/gpu/test_cuda_kernels.py", "-k", "builtins_agree or tenant_ptx"],
        cwd=ROOT, env={**os.environ, HIDE_NVRTC: "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    print(run.stdout[-4000:], run.stderr[-2000:])
    assert run.returncode == 0
    assert "Built-in kernels linked from the shipped PTX" in run.stdout + run.stderr
    assert "Compiled built-in kernels" not in run.stdout + run.stderr
