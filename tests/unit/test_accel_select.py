"""Backend selection: cpu on request, auto falls back with the reason logged and exported, an explicit
cuda with no usable GPU fails with a clear message. Runs in child processes with no visible GPU, so
the outcome is the same on CI and on the GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from prometheus_client import generate_latest

from tensorwasm.runtime import metrics
from tensorwasm.runtime.accel import select_accelerator

CHILD = r"""
import json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from prometheus_client import generate_latest
from tensorwasm.runtime import metrics
from tensorwasm.runtime.accel import select_accelerator
from tensorwasm.runtime.errors import AcceleratorFailed
try:
    acc = select_accelerator(sys.argv[1])
    out = {"backend": acc.name, "reason": getattr(acc, "fallback_reason", "")}
except AcceleratorFailed as exc:
    out = {"error": exc.message}
text = generate_latest(metrics.REGISTRY).decode()
out["metrics"] = [l for l in text.splitlines() if l.startswith("tensorwasm_accelerator")]
print(json.dumps(out))
"""


def _child(mode: str) -> tuple[dict[str, object], str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, whatever the machine has
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_auto_falls_back_to_cpu_with_the_reason_logged_and_exported() -> None:
    out, log = _child("auto")
    assert out["backend"] == "cpu"
    reason = str(out["reason"])
    assert reason
    assert "Fell back to the CPU accelerator" in log
    info = [m for m in out["metrics"] if m.startswith("tensorwasm_accelerator_info")]  # type: ignore[union-attr]
    assert len(info) == 1 and 'backend="cpu"' in info[0] and 'requested="auto"' in info[0]
    assert 'fallback_reason=""' not in info[0]


def test_explicit_cuda_without_a_gpu_fails_clearly() -> None:
    out, _ = _child("cuda")
    assert str(out["error"]).startswith("--accelerator=cuda was asked for but ")


def test_cpu_mode_exports_backend_and_tenant_bytes() -> None:
    acc = select_accelerator("cpu")
    try:
        dev = acc.open_tenant("metered", 8 << 20)
        dev.alloc(3 << 20)
        text = generate_latest(metrics.REGISTRY).decode()
        assert (
            'tensorwasm_accelerator_info{backend="cpu",device="cpu",fallback_reason="",requested="cpu"} 1.0'
            in text
        )
        assert 'tensorwasm_tenant_gpu_memory_bytes{tenant="metered"} 4.194304e+06' in text
        assert 'tensorwasm_tenant_gpu_memory_limit_bytes{tenant="metered"} 8.388608e+06' in text
        assert "tensorwasm_accelerator_healthy 1.0" in text
        assert "tensorwasm_gpu_memory_total_bytes" not in text  # no GPU: no NVML metrics, no errors
        with pytest.raises(Exception, match="GPU allocation"):
            dev.alloc(5 << 20)
        refused = metrics.REGISTRY.get_sample_value(
            "tensorwasm_gpu_alloc_refused_total", {"tenant": "metered", "layer": "host"}
        )
        assert refused == 1.0
    finally:
        acc.close()


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, cuda, cpu"):
        select_accelerator("gpu")
