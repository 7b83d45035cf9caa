"""GPU byte reservations go back on every failure path (issue 13): after each failure the cap's
counter holds exactly what the live buffers hold, on the CPU backend (the CUDA twin of these is
tests/gpu/test_cuda_reservations.py). Host memory running out is real where it can be (17 TiB) and
injected into numpy (not ours) where it must land part way through a multi-buffer restore."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from tensorwasm.runtime.accel import CpuAccelerator
from tensorwasm.runtime.engine import Engine
from tensorwasm.runtime.errors import GpuMemoryExhausted, GuestTrap
from tests.unit.engine_helpers import inline, pool

MiB = 1 << 20
IMPORTS = """
  (import "tensorwasm" "gpu_alloc" (func $gpu_alloc (param i64) (result i64)))
"""


class FailingZeros:
    """np.zeros that fails on its `fail_at`-th call (counting from 1) with `error`."""

    def __init__(self, real: Callable[..., Any], fail_at: int, error: BaseException) -> None:
        self.real, self.fail_at, self.error, self.calls = real, fail_at, error, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return self.real(*args, **kwargs)


@pytest.fixture
def accel() -> Iterator[CpuAccelerator]:
    a = CpuAccelerator()
    yield a
    a.close()


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    e = Engine()
    yield e
    e.close()


def test_an_allocation_the_host_cannot_back_on_an_uncapped_tenant_is_not_counted(
    accel: CpuAccelerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = accel.open_tenant("t", cap_bytes=None)  # accounting only: the cap refuses nothing
    with monkeypatch.context() as m:  # an overcommitting host may hand out 17 TiB lazily: inject
        m.setattr(np, "zeros", FailingZeros(np.zeros, 1, MemoryError("injected")))
        with pytest.raises(GpuMemoryExhausted):
            dev.alloc(17 << 40)  # issue 13 saw these 17 TiB stay counted
    assert dev.bytes_in_use() == 0
    dev.free(dev.alloc(MiB))
    assert dev.bytes_in_use() == 0


def test_an_allocation_whose_host_memory_fails_is_not_counted(
    accel: CpuAccelerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = accel.open_tenant("t", cap_bytes=64 * MiB)
    live = dev.alloc(MiB)
    held = dev.bytes_in_use()
    monkeypatch.setattr(np, "zeros", FailingZeros(np.zeros, 1, MemoryError("injected")))
    with pytest.raises(GpuMemoryExhausted):
        dev.alloc(MiB)
    assert dev.bytes_in_use() == held
    assert dev.buffers() == {live: MiB}


@pytest.mark.parametrize(
    "error", [MemoryError("injected"), RuntimeError("injected")], ids=["memory", "other"]
)
@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_a_staged_restore_failing_part_way_leaves_the_live_buffers_and_their_count(
    accel: CpuAccelerator, monkeypatch: pytest.MonkeyPatch, fail_at: int, error: BaseException
) -> None:
    dev = accel.open_tenant("t", cap_bytes=64 * MiB)
    live = dev.alloc(MiB)
    dev.write(live, 0, b"lasting state")
    held = dev.bytes_in_use()
    with monkeypatch.context() as m:
        m.setattr(np, "zeros", FailingZeros(np.zeros, fail_at, error))
        with pytest.raises(GpuMemoryExhausted if isinstance(error, MemoryError) else RuntimeError):
            dev.stage_restore({1: MiB, 2: 3 * MiB, 3: MiB})
    assert dev.bytes_in_use() == held
    assert dev.buffers() == {live: MiB} and dev.read(live, 0, 13) == b"lasting state"
    dev.publish_restore(dev.stage_restore({1: MiB, 2: 3 * MiB}))  # the next restore has its room
    assert dev.buffers() == {1: MiB, 2: 3 * MiB}
    assert dev.bytes_in_use() == dev.cap.charge_for(MiB) + dev.cap.charge_for(3 * MiB)


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_a_restore_failing_part_way_returns_every_byte(
    accel: CpuAccelerator, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    dev = accel.open_tenant("t", cap_bytes=64 * MiB)
    dev.alloc(MiB)
    with monkeypatch.context() as m:
        m.setattr(np, "zeros", FailingZeros(np.zeros, fail_at, MemoryError("injected")))
        with pytest.raises(GpuMemoryExhausted):
            dev.restore_buffers({1: MiB, 2: MiB, 3: MiB})
    # A restore replaces everything; failing, it leaves nothing behind and nothing counted.
    assert dev.buffers() == {} and dev.bytes_in_use() == 0
    dev.restore_buffers({1: MiB, 2: MiB, 3: MiB})
    assert dev.bytes_in_use() == 3 * dev.cap.charge_for(MiB)


def test_a_guest_alloc_the_host_cannot_back_returns_its_bytes(
    engine: Engine, accel: CpuAccelerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = inline(
        engine,
        """
        (func (export "huge") (param i32 i32) (result i64)
          (i64.store (i32.const 4096) (call $gpu_alloc (i64.const 0x1000_0000_0000)))
          (i64.const 0x0000_1000_0000_0008))
        """,
        IMPORTS,
    )
    dev = accel.open_tenant("t", cap_bytes=None)
    p = pool(engine, m, device=dev)
    monkeypatch.setattr(np, "zeros", FailingZeros(np.zeros, 1, MemoryError("injected")))
    out = p.invoke("huge", b"")  # the guest handled the refusal: it returns the code it got
    assert struct.unpack("<q", out)[0] == -3  # E_GPU_MEMORY
    assert dev.bytes_in_use() == 0


def test_a_guest_that_traps_holding_buffers_returns_them_when_its_tenant_closes(
    engine: Engine, accel: CpuAccelerator
) -> None:
    m = inline(
        engine,
        """
        (func (export "grab") (param i32 i32) (result i64)
          (drop (call $gpu_alloc (i64.const 1048576)))
          (drop (call $gpu_alloc (i64.const 3145728)))
          unreachable)
        """,
        IMPORTS,
    )
    dev = accel.open_tenant("t", cap_bytes=64 * MiB)
    p = pool(engine, m, device=dev)
    with pytest.raises(GuestTrap):
        p.invoke("grab", b"")
    # Buffers are the tenant's lasting state (they outlive an invoke), bounded by its cap ...
    assert dev.bytes_in_use() == dev.cap.charge_for(MiB) + dev.cap.charge_for(3 * MiB)
    p.close()
    accel.close_tenant("t")
    assert dev.bytes_in_use() == 0  # ... and go back with the tenant
