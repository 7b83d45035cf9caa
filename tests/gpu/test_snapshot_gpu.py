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
from tensorwasm.runtime.errors import SnapshotRejected
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
