"""Snapshots on a real GPU: capture + restore through the CUDA backend is bit-exact, caps hold.

Uses the real engine, the CUDA accelerator (pinned staging, async H2D on the tenant's stream) and
the CPU backend as the oracle for the same blob.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.runtime.accel.cpu import CpuAccelerator
from tensorwasm.runtime.engine import CompiledModule, Engine, GuestLimits, TenantInstancePool, WasmState
from tensorwasm.runtime.errors import GpuMemoryExhausted, SnapshotRejected
from tensorwasm.runtime.snapshots.capture import capture_snapshot
from tensorwasm.runtime.snapshots.restore import restore_snapshot
from tensorwasm.runtime.snapshots.store import SnapshotStore

UID = "gpu-snapshot-tenant"
MiB = 1 << 20


@pytest.fixture(scope="module")
def module(stateful_module: CompiledModule) -> CompiledModule:
    return stateful_module  # tests/conftest.py


def tenant(acc: Any, engine: Engine, module: Any, name: str, cap: int) -> tuple[TenantInstancePool, Any]:
    device = acc.open_tenant(name, cap)
    return TenantInstancePool(
        engine, module, GuestLimits(memory_bytes=4 * MiB), device=device, tenant_id=name
    ), device


def fill(pool: TenantInstancePool, device: Any, rng: random.Random, sizes: list[int]) -> dict[int, bytes]:
    state = pool.capture_state()
    pool.restore_state(
        WasmState(memory=rng.randbytes(2 * MiB), globals=[(n, t, 3) for n, t, _ in state.globals])
    )
    out = {}
    for size in sizes:
        handle = device.alloc(size)
        data = rng.randbytes(size // 2) + bytes(size - size // 2)
        device.write(handle, 0, data)
        out[handle] = data
    device.sync()
    return out


def test_cuda_round_trip_is_bit_exact_and_matches_the_cpu_oracle(
    cuda_acc: Any, engine: Engine, module: Any, tmp_path: Path
) -> None:
    rng = random.Random(1)
    store = SnapshotStore(tmp_path)
    pool, dev = tenant(cuda_acc, engine, module, "gpu-src", 256 * MiB)
    gpu = fill(pool, dev, rng, [1, 4097, 9 * MiB + 3, 40 * MiB])
    memory = bytes(pool.capture_state().memory)
    shot = capture_snapshot(
        store,
        tenant_uid=UID,
        module_sha256=module.sha256,
        generation=1,
        pool=pool,
        device=dev,
        accelerator=cuda_acc,
    )
    pool2, dev2 = tenant(cuda_acc, engine, module, "gpu-dst", 256 * MiB)
    dev2.alloc(3 * MiB)  # replaced by the restore
    restore_snapshot(
        shot.path, tenant_uid=UID, module_sha256=module.sha256, pool=pool2, device=dev2, accelerator=cuda_acc
    )
    assert dev2.buffers() == {h: len(d) for h, d in gpu.items()}
    assert {h: dev2.read(h, 0, len(d)) for h, d in gpu.items()} == gpu
    assert bytes(pool2.capture_state().memory) == memory
    # The CPU backend restores the same blob to the same bytes (it is the oracle for the CUDA one).
    cpu = CpuAccelerator()
    try:
        pool3, dev3 = tenant(cpu, engine, module, "cpu-dst", 256 * MiB)
        restore_snapshot(shot.path, tenant_uid=UID, module_sha256=module.sha256, pool=pool3, device=dev3)
        assert {h: dev3.read(h, 0, len(d)) for h, d in gpu.items()} == gpu
    finally:
        cpu.close()
    for name in ("gpu-src", "gpu-dst"):
        cuda_acc.close_tenant(name)


def test_cuda_restore_over_the_cap_is_refused_and_keeps_buffers(
    cuda_acc: Any, engine: Engine, module: Any, tmp_path: Path
) -> None:
    rng = random.Random(2)
    pool, dev = tenant(cuda_acc, engine, module, "gpu-big", 128 * MiB)
    fill(pool, dev, rng, [64 * MiB])
    shot = capture_snapshot(
        SnapshotStore(tmp_path), tenant_uid=UID, module_sha256=module.sha256, generation=1, pool=pool,
        device=dev, accelerator=cuda_acc,
    )  # fmt: skip
    pool2, dev2 = tenant(cuda_acc, engine, module, "gpu-small", 32 * MiB)
    kept = fill(pool2, dev2, rng, [MiB])
    with pytest.raises(SnapshotRejected, match="over the tenant's cap"):
        restore_snapshot(
            shot.path,
            tenant_uid=UID,
            module_sha256=module.sha256,
            pool=pool2,
            device=dev2,
            accelerator=cuda_acc,
        )
    assert {h: dev2.read(h, 0, len(d)) for h, d in kept.items()} == kept
    for name in ("gpu-big", "gpu-small"):
        cuda_acc.close_tenant(name)


def test_cuda_hot_tier_hit_is_bit_exact_and_a_damaged_entry_never_reaches_the_device(
    cuda_acc: Any, engine: Engine, module: Any, tmp_path: Path
) -> None:
    from tensorwasm.runtime.snapshots.hot_tier import HotTier

    tier = HotTier(256 * MiB, cuda_acc.host_region)  # page-locked: restore = H2D from it
    rng = random.Random(3)
    pool, dev = tenant(cuda_acc, engine, module, "hot-src", 256 * MiB)
    gpu = fill(pool, dev, rng, [4097, 9 * MiB + 3, 20 * MiB])
    memory = bytes(pool.capture_state().memory)
    shot = capture_snapshot(
        SnapshotStore(tmp_path), tenant_uid=UID, module_sha256=module.sha256, generation=1, pool=pool,
        device=dev, accelerator=cuda_acc, hot=tier,
    )  # fmt: skip
    assert shot.hot
    pool2, dev2 = tenant(cuda_acc, engine, module, "hot-dst", 256 * MiB)
    dev2.alloc(3 * MiB)  # replaced by the restore
    result = restore_snapshot(
        shot.path, tenant_uid=UID, module_sha256=module.sha256, pool=pool2, device=dev2, accelerator=cuda_acc,
        hot=tier,
    )  # fmt: skip
    assert result.source == "hot"
    assert {h: dev2.read(h, 0, len(d)) for h, d in gpu.items()} == gpu
    assert bytes(pool2.capture_state().memory) == memory
    assert dev2.bytes_in_use() == sum(-(-len(d) // (2 * MiB)) * 2 * MiB for d in gpu.values())
    # Damage the pinned copy and remove the file: the restore is refused and the tenant keeps its state.
    with tier.lease(shot.digest) as entry:
        assert entry is not None
        entry.slot.view[100] ^= 0x01  # inside the first GPU buffer (the layout puts buffers first)
    shot.path.unlink()
    pool3, dev3 = tenant(cuda_acc, engine, module, "hot-keep", 256 * MiB)
    kept = fill(pool3, dev3, rng, [MiB, 5 * MiB])
    in_use = dev3.bytes_in_use()
    with pytest.raises(SnapshotRejected):
        restore_snapshot(
            shot.path, tenant_uid=UID, module_sha256=module.sha256, pool=pool3, device=dev3,
            accelerator=cuda_acc, hot=tier,
        )  # fmt: skip
    assert {h: dev3.read(h, 0, len(d)) for h, d in kept.items()} == kept
    assert dev3.buffers() == {h: len(d) for h, d in kept.items()} and dev3.bytes_in_use() == in_use
    assert shot.digest not in tier
    for name in ("hot-src", "hot-dst", "hot-keep"):
        cuda_acc.close_tenant(name)


def test_cuda_staged_buffers_publish_under_snapshot_handles_or_free_on_discard(cuda_acc: Any) -> None:
    dev = cuda_acc.open_tenant("staged", 16 * MiB)
    live = dev.alloc(MiB)
    dev.write(live, 0, b"L" * MiB)
    staged = dev.stage_restore({1: 4096, 7: 3 * MiB})
    assert dev.bytes_in_use() == 4 * 2 * MiB  # both sets counted while unpublished (3 MiB: two pages)
    for handle, temp in staged.items():
        dev.write(temp, 0, bytes([handle]) * 4096)
    dev.publish_restore(staged)
    assert dev.buffers() == {1: 4096, 7: 3 * MiB} and dev.bytes_in_use() == 3 * 2 * MiB
    assert dev.read(7, 0, 4096) == bytes([7]) * 4096 and dev.read(1, 0, 4096) == bytes([1]) * 4096
    assert dev.alloc(1) == 8  # new handles continue after the snapshot's
    with pytest.raises(GpuMemoryExhausted):
        dev.stage_restore({1: 16 * MiB})  # no room beside the live buffers: refused as a whole
    assert dev.bytes_in_use() == 4 * 2 * MiB
    cuda_acc.close_tenant("staged")


def test_cuda_clone_is_a_frozen_copy(cuda_acc: Any) -> None:
    dev = cuda_acc.open_tenant("clone", 64 * MiB)
    h = dev.alloc(10 * MiB + 5)
    before = random.Random(4).randbytes(10 * MiB + 5)
    dev.write(h, 0, before)
    clone = dev.clone_buffers()
    assert clone is not None
    dev.write(h, 0, b"\0" * (10 * MiB + 5))  # the tenant runs on after the barrier
    out = bytearray(10 * MiB + 5)
    clone.read_into(h, memoryview(out))
    clone.close()
    assert bytes(out) == before
    cuda_acc.close_tenant("clone")


def test_cuda_word_sums_match_the_host(cuda_acc: Any) -> None:
    from tensorwasm.runtime.accel.checksum import chunk_word_sums

    dev = cuda_acc.open_tenant("sums", 64 * MiB)
    rng = random.Random(5)
    datas = [rng.randbytes(n) for n in (8, 13, 4 * MiB, 9 * MiB + 5, 256 * 1024 - 3)]
    handles = []
    for data in datas:
        h = dev.alloc(len(data))
        dev.write(h, 0, data)
        handles.append(h)
    for chunk in (64 * 1024, 1 * MiB, 4 * MiB):
        got = dev.word_sums(handles, chunk)
        assert got == [chunk_word_sums(memoryview(d), chunk) for d in datas], chunk
    cuda_acc.close_tenant("sums")
