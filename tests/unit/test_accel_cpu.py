"""The CPU backend: the oracle. Caps, handles, copies, built-in kernels against float64 numpy,
launch checks, restore and teardown, through the same interface the CUDA backend offers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tensorwasm.runtime.accel.base import DEFAULT_GRANULARITY, KernelArg
from tensorwasm.runtime.accel.cpu import CpuAccelerator, CpuTenantDevice
from tensorwasm.runtime.errors import (
    BadRequest,
    GpuMemoryExhausted,
    InvalidKernelLaunch,
    ModuleRejected,
    TenantNotReady,
)

MiB = 1 << 20
SAXPY_PTX = (Path(__file__).parents[1] / "gpu" / "saxpy_tenant.ptx").read_text()


@pytest.fixture
def acc() -> Iterator[CpuAccelerator]:
    a = CpuAccelerator()
    yield a
    a.close()


@pytest.fixture
def dev(acc: CpuAccelerator) -> CpuTenantDevice:
    return acc.open_tenant("t1", 16 * MiB, {"axpy_tenant": SAXPY_PTX})


def B(h: int) -> KernelArg:
    return KernelArg("buffer", h)


def _put(dev: CpuTenantDevice, a: np.ndarray) -> int:
    h = dev.alloc(a.nbytes)
    dev.write(h, 0, a.tobytes())
    return h


def _get(dev: CpuTenantDevice, h: int, n: int) -> np.ndarray:
    return np.frombuffer(dev.read(h, 0, 4 * n), np.float32)


def test_cap_is_enforced_at_pool_granularity(dev: CpuTenantDevice) -> None:
    handles = [dev.alloc(1) for _ in range(16 * MiB // DEFAULT_GRANULARITY)]
    assert dev.bytes_in_use() == 16 * MiB
    with pytest.raises(GpuMemoryExhausted) as info:
        dev.alloc(1)
    assert info.value.limit == 16 * MiB and info.value.current == 16 * MiB
    dev.free(handles[0])
    assert dev.bytes_in_use() == 16 * MiB - DEFAULT_GRANULARITY
    with pytest.raises(BadRequest):
        dev.free(handles[0])  # double free


def test_handles_are_per_tenant(acc: CpuAccelerator, dev: CpuTenantDevice) -> None:
    other = acc.open_tenant("t2", None)
    h = dev.alloc(8)
    dev.write(h, 0, b"secret!!")
    with pytest.raises(BadRequest):
        other.read(h, 0, 8)  # a handle means nothing outside its tenant
    assert other.bytes_in_use() == 0
    with pytest.raises(BadRequest):
        acc.open_tenant("t2", None)


def test_copies_are_bounds_checked(dev: CpuTenantDevice) -> None:
    h = dev.alloc(100)
    dev.write(h, 90, b"0123456789")
    assert dev.read(h, 90, 10) == b"0123456789"
    out = bytearray(4)
    dev.read_into(h, 92, memoryview(out))
    assert out == b"2345"
    for offset, length in [(91, 10), (-1, 1), (0, 101)]:
        with pytest.raises(BadRequest):
            dev.read(h, offset, length)
    with pytest.raises(BadRequest):
        dev.write(h, 95, b"0123456789")
    staging = CpuAccelerator().pinned_buffer(6)
    staging[:] = b"abcdef"
    dev.write_async(h, 0, staging)
    dev.sync()
    assert dev.read(h, 0, 6) == b"abcdef"


@pytest.mark.parametrize("grid", [(1, 1, 1), (3, 2, 1)])
def test_builtin_kernels_match_float64_references(dev: CpuTenantDevice, grid: tuple[int, int, int]) -> None:
    rng = np.random.default_rng()
    n = int(rng.integers(1, 5000))
    x, y = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    hx, hy, ho = _put(dev, x), _put(dev, y), dev.alloc(4 * n)
    block = (128, 1, 1)
    dev.launch("vector_add", grid, block, [B(hx), B(hy), B(ho), KernelArg("u32", n)])
    np.testing.assert_allclose(_get(dev, ho, n), x.astype(np.float64) + y, rtol=1e-6)
    dev.launch("saxpy", grid, block, [KernelArg("f32", 2.5), B(hx), B(hy), KernelArg("u32", n)])
    np.testing.assert_allclose(_get(dev, hy, n), 2.5 * x.astype(np.float64) + y, rtol=1e-5, atol=1e-6)
    hs = _put(dev, np.array([1.0], np.float32))
    dev.launch("reduce_sum", grid, block, [B(hx), B(hs), KernelArg("u32", n)])
    assert _get(dev, hs, 1)[0] == pytest.approx(1.0 + x.astype(np.float64).sum(), rel=1e-4, abs=1e-3)
    m, k, p = (int(v) for v in rng.integers(1, 40, 3))
    a, b = rng.standard_normal(m * k).astype(np.float32), rng.standard_normal(k * p).astype(np.float32)
    ha, hb, hc = _put(dev, a), _put(dev, b), dev.alloc(4 * m * p)
    dev.launch("matmul", grid, block, [B(ha), B(hb), B(hc), *(KernelArg("u32", v) for v in (m, p, k))])
    ref = a.astype(np.float64).reshape(m, k) @ b.astype(np.float64).reshape(k, p)
    np.testing.assert_allclose(_get(dev, hc, m * p).reshape(m, p), ref, rtol=1e-4, atol=1e-4)


def test_launch_is_refused_before_anything_runs(dev: CpuTenantDevice) -> None:
    a, b, c = dev.alloc(400), dev.alloc(400), dev.alloc(400)
    dev.write(c, 0, b"\x07" * 400)
    ok = [B(a), B(b), B(c), KernelArg("u32", 100)]
    bad: list[dict[str, object]] = [
        {"kernel": "nope"},
        {"grid": (0, 1, 1)},
        {"grid": (1, 65536, 1)},
        {"grid": (1, 1)},
        {"grid": "abc"},
        {"block": (1025, 1, 1)},
        {"block": (32, 32, 2)},
        {"block": (1, 1, 65)},
        {"shared_mem_bytes": -1},
        {"shared_mem_bytes": 48 * 1024 + 1},
        {"args": ok[:3]},
        {"args": [*ok, KernelArg("u32", 1)]},
        {"args": [*ok[:3], KernelArg("i32", 100)]},
        {"args": [*ok[:3], KernelArg("u32", 2**32)]},
        {"args": [*ok[:3], KernelArg("u32", 1.0)]},
        {"args": [*ok[:3], KernelArg("u32", True)]},
        {"args": [KernelArg("u64", 12345), *ok[1:]]},  # built-ins take handles, never addresses
        {"args": [B(999), *ok[1:]]},
        {"args": [*ok[:3], KernelArg("u32", 101)]},  # buffers hold 100 floats
        {"args": [*ok[:3], "100"]},
    ]
    for override in bad:
        call: dict[str, object] = {"kernel": "vector_add", "grid": (1, 1, 1), "block": (32, 1, 1), "args": ok}
        call.update(override)
        with pytest.raises(InvalidKernelLaunch):
            dev.launch(**call)  # type: ignore[arg-type]
    assert dev.read(c, 0, 400) == b"\x07" * 400  # nothing ran
    with pytest.raises(InvalidKernelLaunch):
        dev.launch(
            "saxpy", (1, 1, 1), (32, 1, 1), [KernelArg("f32", float("nan")), B(a), B(b), KernelArg("u32", 1)]
        )
    with pytest.raises(InvalidKernelLaunch):
        dev.launch("saxpy", (1, 1, 1), (32, 1, 1), [KernelArg("f32", 1e39), B(a), B(b), KernelArg("u32", 1)])


def test_tenant_ptx_is_checked_but_needs_cuda(dev: CpuTenantDevice) -> None:
    a, b = dev.alloc(40), dev.alloc(40)
    with pytest.raises(InvalidKernelLaunch, match="arguments"):
        dev.launch("axpy_tenant", (1, 1, 1), (32, 1, 1), [KernelArg("f32", 1.0), B(a)])
    with pytest.raises(InvalidKernelLaunch, match="cuda backend"):
        dev.launch(
            "axpy_tenant", (1, 1, 1), (32, 1, 1), [KernelArg("f32", 1.0), B(a), B(b), KernelArg("u32", 10)]
        )


def test_bad_tenant_ptx_is_rejected_at_open(acc: CpuAccelerator) -> None:
    with pytest.raises(ModuleRejected):
        acc.open_tenant("x", None, {"missing": SAXPY_PTX})
    with pytest.raises(BadRequest):
        acc.open_tenant("y", None, {"saxpy": SAXPY_PTX.replace("axpy_tenant", "saxpy")})
    with pytest.raises(BadRequest):
        acc.open_tenant("", None)


def test_restore_buffers_is_all_or_nothing(dev: CpuTenantDevice) -> None:
    h = dev.alloc(10)
    dev.write(h, 0, b"keep me!!!")
    with pytest.raises(GpuMemoryExhausted):
        dev.restore_buffers({1: 10 * MiB, 2: 7 * MiB})
    assert dev.read(h, 0, 10) == b"keep me!!!"
    with pytest.raises(BadRequest):
        dev.restore_buffers({0: 10})
    dev.restore_buffers({3: 100, 8: 3 * MiB})
    assert dev.buffers() == {3: 100, 8: 3 * MiB}
    assert dev.bytes_in_use() == 3 * DEFAULT_GRANULARITY
    assert dev.alloc(1) == 9  # new handles never collide with restored ones


def test_close_tenant_frees_everything(acc: CpuAccelerator, dev: CpuTenantDevice) -> None:
    h = dev.alloc(MiB)
    acc.close_tenant("t1")
    assert dev.bytes_in_use() == 0
    with pytest.raises(TenantNotReady):
        dev.alloc(1)
    with pytest.raises(BadRequest):
        dev.read(h, 0, 1)
    assert acc.open_tenant("t1", None).bytes_in_use() == 0


def test_health_and_memory_info(acc: CpuAccelerator) -> None:
    health = acc.health()
    assert health.ok and health.reason == "" and health.mps in ("off", "client")
    free, total = acc.memory_info()
    assert 0 < free <= total
