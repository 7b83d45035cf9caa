"""CUDA twin of tests/unit/test_gpu_reservations.py: the host counter gives back every byte on the
driver's refusal paths (alloc, staged and in-place restore failing part way). The driver's answer
is what is injected (cuMemAllocFromPoolAsync returning OUT_OF_MEMORY from the n-th call on, so the
trim-and-retry sees it too); the pool, the stream and every other call are the real device's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tensorwasm.runtime.errors import GpuMemoryExhausted

MiB = 1 << 20


class RefusingAlloc:
    """cuMemAllocFromPoolAsync that answers OUT_OF_MEMORY from its `fail_from`-th call on."""

    def __init__(self, real: Callable[..., Any], fail_from: int) -> None:
        from cuda.bindings import driver as cu

        self.real, self.fail_from, self.calls = real, fail_from, 0
        self.oom = cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls >= self.fail_from:
            return self.oom, None
        return self.real(*args)


def _refuse_from(monkeypatch: pytest.MonkeyPatch, fail_from: int) -> None:
    from tensorwasm.runtime.accel import cuda

    monkeypatch.setattr(cuda, "_alloc_async", RefusingAlloc(cuda._alloc_async, fail_from))


def test_a_refused_alloc_is_not_counted(cuda_acc: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for cap in (64 * MiB, None):
        dev = cuda_acc.open_tenant(f"refused-{cap}", cap)
        try:
            live = dev.alloc(MiB)
            held = dev.bytes_in_use()
            with monkeypatch.context() as m:
                _refuse_from(m, 1)
                with pytest.raises(GpuMemoryExhausted):
                    dev.alloc(MiB)
            assert dev.bytes_in_use() == held and dev.buffers() == {live: MiB}
        finally:
            cuda_acc.close_tenant(f"refused-{cap}")
        assert dev.bytes_in_use() == 0


def test_an_alloc_whose_binding_raises_is_not_counted(cuda_acc: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorwasm.runtime.accel import cuda

    def raising(*_args: Any) -> Any:
        raise RuntimeError("binding failed")

    dev = cuda_acc.open_tenant("raising", 64 * MiB)
    try:
        held = dev.bytes_in_use()
        for where in ("_alloc_async", "_stream_sync"):  # the first try, and the trim-and-retry
            with monkeypatch.context() as m:
                if where == "_stream_sync":
                    _refuse_from(m, 1)
                m.setattr(cuda, where, raising)
                with pytest.raises(RuntimeError, match="binding failed"):
                    dev.alloc(MiB)
            assert dev.bytes_in_use() == held, where
    finally:
        cuda_acc.close_tenant("raising")


@pytest.mark.parametrize("fail_from", [1, 2, 3])
def test_a_staged_restore_refused_part_way_leaves_the_live_buffers_and_their_count(
    cuda_acc: Any, monkeypatch: pytest.MonkeyPatch, fail_from: int
) -> None:
    dev = cuda_acc.open_tenant(f"staged-{fail_from}", 64 * MiB)
    try:
        live = dev.alloc(MiB)
        dev.write(live, 0, b"lasting state")
        held = dev.bytes_in_use()
        with monkeypatch.context() as m:
            _refuse_from(m, fail_from)
            with pytest.raises(GpuMemoryExhausted):
                dev.stage_restore({1: MiB, 2: 3 * MiB, 3: MiB})
        assert dev.bytes_in_use() == held
        assert dev.buffers() == {live: MiB} and dev.read(live, 0, 13) == b"lasting state"
        dev.publish_restore(dev.stage_restore({1: MiB, 2: 3 * MiB}))
        assert dev.buffers() == {1: MiB, 2: 3 * MiB}
    finally:
        cuda_acc.close_tenant(f"staged-{fail_from}")
    assert dev.bytes_in_use() == 0


@pytest.mark.parametrize("fail_from", [1, 2, 3])
def test_a_restore_refused_part_way_returns_every_byte(
    cuda_acc: Any, monkeypatch: pytest.MonkeyPatch, fail_from: int
) -> None:
    dev = cuda_acc.open_tenant(f"restore-{fail_from}", 64 * MiB)
    try:
        dev.alloc(MiB)
        with monkeypatch.context() as m:
            _refuse_from(m, fail_from)
            with pytest.raises(GpuMemoryExhausted):
                dev.restore_buffers({1: MiB, 2: MiB, 3: MiB})
        assert dev.buffers() == {} and dev.bytes_in_use() == 0
        dev.restore_buffers({1: MiB, 2: MiB, 3: MiB})
        assert dev.bytes_in_use() == 3 * dev.cap.charge_for(MiB)
    finally:
        cuda_acc.close_tenant(f"restore-{fail_from}")
