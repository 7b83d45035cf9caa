"""MPS client environment from a shard's capacity, the reported MPS state, and NVML without a GPU."""

from __future__ import annotations

import pytest

from tensorwasm.runtime.accel import mps
from tensorwasm.runtime.accel.nvml import NvmlTelemetry
from tensorwasm.runtime.errors import AcceleratorFailed, BadRequest


def test_client_env_from_shard_capacity() -> None:
    env = mps.build_client_env("/run/mps", 25, (4 << 30) + (3 << 19), device=1, log_dir="/var/log/mps")
    assert env == {
        "CUDA_MPS_PIPE_DIRECTORY": "/run/mps",
        "CUDA_MPS_LOG_DIRECTORY": "/var/log/mps",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "1=4097M",  # rounded down to whole MiB, never up
    }
    assert mps.build_client_env("/run/mps") == {"CUDA_MPS_PIPE_DIRECTORY": "/run/mps"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pipe_dir": ""},
        {"pipe_dir": "/p", "active_thread_percentage": 0},
        {"pipe_dir": "/p", "active_thread_percentage": 101},
        {"pipe_dir": "/p", "active_thread_percentage": 50.0},
        {"pipe_dir": "/p", "pinned_mem_limit_bytes": 1000},
        {"pipe_dir": "/p", "pinned_mem_limit_bytes": 1 << 30, "device": -1},
    ],
)
def test_bad_mps_settings_fail_fast(kwargs: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        mps.build_client_env(**kwargs)  # type: ignore[arg-type]


def test_mode_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    monkeypatch.delenv(mps.THREADS_ENV, raising=False)
    assert mps.current_mode() == "off"
    mps.apply_client_env(mps.build_client_env("/tmp/tw-mps-pipe", 50))
    assert mps.current_mode() == "client"


def test_daemon_without_the_control_binary_fails_clearly(tmp_path: object) -> None:
    daemon = mps.MpsDaemon(f"{tmp_path}/pipe")
    daemon.binary = None
    with pytest.raises(AcceleratorFailed, match="nvidia-cuda-mps-control"):
        daemon.start()
    daemon.stop()  # stopping a daemon that never started is harmless
    assert mps.current_mode() in ("off", "client")


def test_nvml_without_a_gpu_reports_nothing_and_raises_nothing() -> None:
    telemetry = NvmlTelemetry()
    devices = telemetry.read()
    if devices:  # on the GPU machine
        assert all(d.memory_total_bytes > 0 and 0 <= d.utilization_ratio <= 1 for d in devices)
    else:
        assert telemetry.unavailable_reason
    telemetry.close()
