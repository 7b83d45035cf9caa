"""Accelerator selection: `auto` (CUDA, else CPU with the reason logged and exported), `cuda`, `cpu`.

Owns `select_accelerator` and the wiring of the chosen backend into the GPU metrics section. The CUDA
module is imported lazily here, so a CPU-only image never loads cuda.bindings.
Must not import cuda (only accel/cuda.py does) or wasmtime.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tensorwasm.runtime import metrics
from tensorwasm.runtime.accel.base import (
    Accelerator,
    AcceleratorHealth,
    KernelArg,
    TenantDevice,
    TenantUsage,
)
from tensorwasm.runtime.accel.cpu import CpuAccelerator
from tensorwasm.runtime.accel.nvml import NvmlTelemetry
from tensorwasm.runtime.errors import AcceleratorFailed

__all__ = [
    "Accelerator",
    "AcceleratorHealth",
    "CpuAccelerator",
    "KernelArg",
    "TenantDevice",
    "TenantUsage",
    "open_cuda",
    "select_accelerator",
]

log = logging.getLogger(__name__)
MODES = ("auto", "cuda", "cpu")


def open_cuda(device: int = 0, cache_dir: Path | None = None) -> Accelerator:
    """Start the CUDA backend or raise AcceleratorFailed saying why no GPU is usable."""
    try:
        from tensorwasm.runtime.accel.cuda import CudaAccelerator  # deferred: needs cuda-bindings
    except ImportError as exc:
        raise AcceleratorFailed(f"cuda-bindings is not installed ({exc}); install tensorwasm[gpu]") from None
    try:
        acc: Accelerator = CudaAccelerator(device, cache_dir)
        return acc
    except AcceleratorFailed:
        raise
    except Exception as exc:  # the driver library missing, no device, NVRTC missing ...
        raise AcceleratorFailed(f"no usable CUDA device {device}: {type(exc).__name__}: {exc}") from None


def select_accelerator(mode: str = "auto", device: int = 0, cache_dir: Path | None = None) -> Accelerator:
    """The backend for this shard; also makes it the source of the GPU metrics."""
    if mode not in MODES:
        raise ValueError(f"accelerator mode must be one of {', '.join(MODES)}, got {mode!r}")
    acc: Accelerator
    if mode == "cpu":
        acc = CpuAccelerator()
    elif mode == "cuda":
        try:
            acc = open_cuda(device, cache_dir)
        except AcceleratorFailed as exc:
            raise AcceleratorFailed(f"--accelerator=cuda was asked for but {exc.message}") from None
    else:
        try:
            acc = open_cuda(device, cache_dir)
        except AcceleratorFailed as exc:
            acc = CpuAccelerator(fallback_reason=exc.message)
            log.warning("Fell back to the CPU accelerator reason=%r", exc.message)
    watch(acc, mode)
    return acc


def watch(acc: Any, requested: str, nvml: NvmlTelemetry | None = None) -> None:
    """Make `acc` what the GPU metrics section reads at scrape time."""
    telemetry = nvml if nvml is not None else NvmlTelemetry()

    def sample() -> metrics.GpuBackendSample:
        health = acc.health()
        devices = tuple(
            metrics.GpuDeviceSample(
                d.index,
                d.name,
                d.memory_total_bytes,
                d.memory_used_bytes,
                d.utilization_ratio,
                d.temperature_celsius,
            )
            for d in (telemetry.read() if acc.name == "cuda" else [])
        )
        return metrics.GpuBackendSample(
            backend=acc.name,
            requested=requested,
            device=getattr(acc, "device_name", ""),
            fallback_reason=getattr(acc, "fallback_reason", ""),
            healthy=health.ok,
            health_reason=health.reason,
            mps=health.mps,
            tenants=tuple(
                (u.tenant_id, u.bytes_in_use, u.cap_bytes, u.pool_reserved_bytes) for u in acc.usage()
            ),
            devices=devices,
        )

    metrics.GPU_BACKEND.source = sample
