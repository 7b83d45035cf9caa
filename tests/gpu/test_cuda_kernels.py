"""CUDA and the CPU oracle agree on every built-in kernel and on a tenant PTX kernel; launches are
checked before the driver sees them; kernels compile once and come from the disk cache after."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorwasm.runtime.accel.base import KernelArg
from tensorwasm.runtime.accel.cpu import CpuAccelerator
from tensorwasm.runtime.errors import BadRequest, GpuMemoryExhausted, InvalidKernelLaunch

HERE = Path(__file__).parent
SAXPY_PTX = (HERE / "saxpy_tenant.ptx").read_text()
SHAPES = [
    ((1, 1, 1), (32, 1, 1)),
    ((7, 3, 1), (96, 1, 1)),
    ((64, 2, 2), (16, 8, 2)),
    ((1024, 1, 1), (256, 1, 1)),
]


def B(h: int) -> KernelArg:
    return KernelArg("buffer", h)


def _upload(dev: Any, arrays: list[np.ndarray]) -> list[int]:
    handles = []
    for a in arrays:
        h = dev.alloc(max(a.nbytes, 4))
        dev.write(h, 0, a.tobytes())
        handles.append(h)
    return handles


@pytest.fixture
def pair(cuda_acc: Any) -> Any:
    cpu = CpuAccelerator()
    ptx = {"axpy_tenant": SAXPY_PTX}
    yield cuda_acc.open_tenant("kernels", 512 << 20, ptx), cpu.open_tenant("kernels", 512 << 20, ptx)
    cuda_acc.close_tenant("kernels")
    cpu.close()


def _rand(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal(n).astype(np.float32)


def _roundtrip(
    dev: Any, kernel: str, grid: Any, block: Any, arrays: list[np.ndarray], spec: list[Any], out: int
) -> np.ndarray:
    handles = _upload(dev, arrays)
    args = [B(handles[s]) if isinstance(s, int) else s for s in spec]
    dev.launch(kernel, grid, block, args)
    dev.sync()
    result = np.frombuffer(dev.read(handles[out], 0, arrays[out].nbytes), np.float32).copy()
    for h in handles:
        dev.free(h)
    return result


@pytest.mark.parametrize(("grid", "block"), SHAPES)
def test_builtins_agree_with_cpu(pair: Any, grid: Any, block: Any) -> None:
    cuda_dev, cpu_dev = pair
    rng = np.random.default_rng()
    n = int(rng.integers(1, 300_000))
    m, k, p = (int(v) for v in rng.integers(1, 96, 3))
    cases = [
        ("vector_add", [_rand(rng, n), _rand(rng, n), np.full(n, np.nan, np.float32)],
         [0, 1, 2, KernelArg("u32", n)], 2),
        ("saxpy", [_rand(rng, n), _rand(rng, n)], [KernelArg("f32", 1.7), 0, 1, KernelArg("u32", n)], 1),
        ("matmul", [_rand(rng, m * k), _rand(rng, k * p), np.full(m * p, np.nan, np.float32)],
         [0, 1, 2, KernelArg("u32", m), KernelArg("u32", p), KernelArg("u32", k)], 2),
        ("reduce_sum", [_rand(rng, n), np.zeros(1, np.float32)], [0, 1, KernelArg("u32", n)], 1),
    ]  # fmt: skip
    for kernel, arrays, spec, out in cases:
        gpu = _roundtrip(cuda_dev, kernel, grid, block, arrays, spec, out)
        cpu = _roundtrip(cpu_dev, kernel, grid, block, arrays, spec, out)
        ref = np.linalg.norm(cpu.astype(np.float64)) or 1.0
        if kernel == "reduce_sum":
            # A sum can cancel to near zero: measure its error against the sum of magnitudes, the
            # scale float32 rounding works at (the order of additions differs between the backends).
            ref = float(np.abs(arrays[0].astype(np.float64)).sum()) or 1.0
        rel = float(np.linalg.norm(gpu.astype(np.float64) - cpu) / ref)
        print(f"{kernel} grid={grid} block={block} n={n} rel_err={rel:.2e}")
        assert not np.isnan(gpu).any()
        assert rel < 1e-5, (kernel, rel)


def test_tenant_ptx_agrees_with_cpu_saxpy(pair: Any) -> None:
    cuda_dev, cpu_dev = pair
    rng = np.random.default_rng()
    n = 1_000_003
    x, y = _rand(rng, n), _rand(rng, n)
    spec = [KernelArg("f32", -0.5), 0, 1, KernelArg("u32", n)]
    gpu = _roundtrip(cuda_dev, "axpy_tenant", (120, 1, 1), (256, 1, 1), [x, y], spec, 1)
    cpu = _roundtrip(cpu_dev, "saxpy", (1, 1, 1), (1, 1, 1), [x, y], spec, 1)
    rel = float(np.linalg.norm(gpu.astype(np.float64) - cpu) / np.linalg.norm(cpu))
    print(f"tenant PTX axpy vs CPU saxpy rel_err={rel:.2e}")
    assert rel < 1e-6


def test_launch_checks_run_before_the_driver(pair: Any, cuda_acc: Any) -> None:
    dev, _ = pair
    a, b, c = dev.alloc(400), dev.alloc(400), dev.alloc(400)
    other = cuda_acc.open_tenant("other", 1 << 30)
    foreign = other.alloc(400)
    ok = [B(a), B(b), B(c), KernelArg("u32", 100)]
    bad = {
        "grid too big": dict(grid=(1, 70000, 1)),
        "grid zero": dict(grid=(0, 1, 1)),
        "block too big": dict(block=(2048, 1, 1)),
        "threads over limit": dict(block=(64, 64, 1)),
        "shared memory": dict(shared_mem_bytes=1 << 20),
        "arg count": dict(args=ok[:3]),
        "arg kind": dict(args=[*ok[:3], KernelArg("f32", 100.0)]),
        "u32 range": dict(args=[*ok[:3], KernelArg("u32", -1)]),
        "unknown handle": dict(args=[B(foreign + 1000), *ok[1:]]),
        "buffer too small": dict(args=[*ok[:3], KernelArg("u32", 101)]),
        "unknown kernel": dict(kernel="nope"),
    }
    try:
        for why, override in bad.items():
            call: dict[str, Any] = dict(
                kernel="vector_add", grid=(1, 1, 1), block=(128, 1, 1), args=ok, shared_mem_bytes=0
            )
            call.update(override)
            with pytest.raises(InvalidKernelLaunch):
                dev.launch(**call)
            print("refused before the driver:", why)
        with pytest.raises(InvalidKernelLaunch):  # tenant PTX: arg kinds from its .param list
            dev.launch(
                "axpy_tenant", (1, 1, 1), (32, 1, 1), [KernelArg("u32", 1), B(a), B(b), KernelArg("u32", 1)]
            )
        dev.launch("vector_add", (1, 1, 1), (128, 1, 1), ok)
        dev.sync()
        assert cuda_acc.health().ok
    finally:
        cuda_acc.close_tenant("other")
        for h in (a, b, c):
            dev.free(h)


def test_copies_pinned_staging_and_restore(pair: Any, cuda_acc: Any) -> None:
    dev, _ = pair
    payload = np.random.default_rng().integers(0, 255, 3 << 20, dtype=np.uint8).tobytes()
    h = dev.alloc(len(payload))
    staging = cuda_acc.pinned_buffer(len(payload))
    staging[:] = payload
    dev.write_async(h, 0, staging)
    dev.sync()
    out = bytearray(len(payload))
    dev.read_into(h, 0, memoryview(out))
    assert bytes(out) == payload
    assert dev.read(h, 1000, 10) == payload[1000:1010]
    with pytest.raises(BadRequest):
        dev.read(h, len(payload) - 5, 10)
    sizes = {7: 1 << 20, 9: 5 << 20}
    dev.restore_buffers(sizes)
    assert dev.buffers() == sizes
    with pytest.raises(GpuMemoryExhausted):
        dev.restore_buffers({1: 600 << 20})
    assert dev.buffers() == sizes  # refused before anything was freed
    dev.restore_buffers({})
    assert dev.bytes_in_use() == 0


def test_kernels_compile_once_and_load_from_disk(cuda_acc: Any, kernel_cache: Path) -> None:
    from tensorwasm.runtime.accel.cuda import CudaAccelerator

    assert list(kernel_cache.glob("builtin-*.cubin"))
    fresh_ptx = SAXPY_PTX.replace("axpy_tenant", "axpy_fresh")
    t0 = time.perf_counter()
    cuda_acc.open_tenant("jit", None, {"axpy_fresh": fresh_ptx})
    first = time.perf_counter() - t0
    cuda_acc.close_tenant("jit")
    cached = list(kernel_cache.glob("ptx-*.cubin"))
    t0 = time.perf_counter()
    cuda_acc.open_tenant("jit", None, {"axpy_fresh": fresh_ptx})
    second = time.perf_counter() - t0
    cuda_acc.close_tenant("jit")
    assert list(kernel_cache.glob("ptx-*.cubin")) == cached
    t0 = time.perf_counter()
    again = CudaAccelerator(0, cache_dir=kernel_cache)  # built-ins from the cubin cache
    start = time.perf_counter() - t0
    again.close()
    print(
        f"tenant PTX open: first {first * 1e3:.1f} ms (link), cached {second * 1e3:.1f} ms; "
        f"accelerator start from cache {start * 1e3:.1f} ms"
    )
