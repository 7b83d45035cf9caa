"""Capture + restore through the real engine and the CPU backend: bit-exact, bound, refusals untouched."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tensorwasm.runtime import metrics
from tensorwasm.runtime.accel.cpu import CpuAccelerator, CpuTenantDevice
from tensorwasm.runtime.engine import CompiledModule, Engine, GuestLimits, TenantInstancePool, WasmState
from tensorwasm.runtime.errors import SnapshotRejected
from tensorwasm.runtime.snapshots import codec
from tensorwasm.runtime.snapshots.capture import capture_snapshot
from tensorwasm.runtime.snapshots.restore import restore_latest, restore_snapshot
from tensorwasm.runtime.snapshots.store import SnapshotStore
from tests.unit.engine_helpers import compile_bytes

PAGE = 65536
MEMORY_LIMIT = 16 * PAGE
GPU_CAP = 8 << 20
UID = "2b7f0c1e-5d8a-4e0f-9c3b-7a1d2e3f4a5b"


@dataclass
class Tenant:
    pool: TenantInstancePool
    device: CpuTenantDevice
    module: CompiledModule


@pytest.fixture(scope="module")
def module(stateful_module: CompiledModule) -> CompiledModule:
    return stateful_module  # tests/conftest.py


@pytest.fixture
def accel() -> Iterator[CpuAccelerator]:
    a = CpuAccelerator()
    yield a
    a.close()


def make_tenant(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, name: str, cap: int | None = GPU_CAP,
    memory_limit: int = MEMORY_LIMIT,
) -> Tenant:  # fmt: skip
    device = accel.open_tenant(name, cap)
    limits = GuestLimits(memory_bytes=memory_limit, max_instances=2)
    return Tenant(TenantInstancePool(engine, module, limits, device=device, tenant_id=name), device, module)


def randomize(t: Tenant, rng: random.Random, *, maximal: bool = False) -> None:
    """A random baseline (memory + every mutable global) and random GPU buffers (maximal = at the caps)."""
    top = t.pool.limits.memory_bytes // PAGE
    pages = top if maximal else rng.randint(1, top)
    memory = bytearray(rng.randbytes(pages * PAGE))
    memory[: pages * PAGE // 2] = bytes(pages * PAGE // 2)  # half zero: exercises both chunk codecs
    current = t.pool.capture_state()
    values: list[tuple[str, str, int | float]] = []
    for name, vt, _ in current.globals:
        if vt == "i32":
            values.append((name, vt, rng.randint(-(2**31), 2**31 - 1)))
        elif vt == "i64":
            values.append((name, vt, rng.randint(-(2**63), 2**63 - 1)))
        else:
            values.append((name, vt, rng.choice([-0.0, float("inf"), rng.uniform(-1e6, 1e6)])))
    t.pool.restore_state(WasmState(memory=bytes(memory), globals=values))
    cap = t.device.cap_bytes or GPU_CAP
    sizes = [cap // 2, cap // 2] if maximal else [rng.randint(1, cap // 8) for _ in range(rng.randint(0, 3))]
    for size in sizes:
        handle = t.device.alloc(size)
        t.device.write(handle, 0, rng.randbytes(size))


def snapshot_of(t: Tenant) -> tuple[bytes, list[tuple[str, str, bytes]], dict[int, bytes]]:
    state = t.pool.capture_state()
    exact = [
        (n, vt, struct.pack("<d", v) if isinstance(v, float) else struct.pack("<q", v))
        for n, vt, v in state.globals
    ]
    gpu = {h: t.device.read(h, 0, n) for h, n in t.device.buffers().items()}
    return bytes(state.memory), sorted(exact), gpu


def capture(store: SnapshotStore, t: Tenant, generation: int = 1, chunk_size: int = 64 << 10) -> Path:
    return capture_snapshot(
        store, tenant_uid=UID, module_sha256=t.module.sha256, generation=generation, pool=t.pool,
        device=t.device, chunk_size=chunk_size,
    ).path  # fmt: skip


def restore(path: Path, t: Tenant, uid: str = UID, module_sha256: str | None = None) -> None:
    restore_snapshot(
        path, tenant_uid=uid, module_sha256=module_sha256 or t.module.sha256, pool=t.pool, device=t.device
    )


@pytest.mark.parametrize("seed", range(8))
def test_round_trip_is_bit_exact_over_random_states(
    seed: int, engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    src = make_tenant(engine, module, accel, "src")
    randomize(src, rng, maximal=seed == 0)
    before = snapshot_of(src)
    path = capture(SnapshotStore(tmp_path), src, chunk_size=rng.choice([4096, 64 << 10, 4 << 20]))
    dst = make_tenant(engine, module, accel, "dst")
    dst.device.write(dst.device.alloc(1000), 0, b"q" * 1000)  # state that the restore must replace
    restore(path, dst)
    assert snapshot_of(dst) == before
    assert snapshot_of(src) == before  # capture changed nothing


def test_empty_gpu_state_round_trips(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    src = make_tenant(engine, module, accel, "src")
    before = snapshot_of(src)
    dst = make_tenant(engine, module, accel, "dst")
    dst.device.alloc(4096)
    restore(capture(SnapshotStore(tmp_path), src), dst)
    assert snapshot_of(dst) == before and dst.device.buffers() == {}


def test_restored_state_is_what_the_next_invoke_sees(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    src = make_tenant(engine, module, accel, "src")
    state = src.pool.capture_state()
    memory = bytearray(state.memory)
    memory[64:68] = struct.pack("<i", 41)  # the counter "bump" increments
    globals_ = [(n, vt, 9 if n == "calls" else v) for n, vt, v in state.globals]
    src.pool.restore_state(WasmState(memory=bytes(memory), globals=globals_))
    dst = make_tenant(engine, module, accel, "dst")
    restore(capture(SnapshotStore(tmp_path), src), dst)
    calls, _hidden, counter = struct.unpack("<3i", dst.pool.invoke("bump", b""))
    assert (calls, counter) == (10, 42)


def test_phase_timings_are_reported_and_observed(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    src = make_tenant(engine, module, accel, "src")
    randomize(src, random.Random(3))
    path = capture(SnapshotStore(tmp_path), src)
    dst = make_tenant(engine, module, accel, "dst")
    before = metrics.REGISTRY.get_sample_value(
        "tensorwasm_snapshot_restore_phase_seconds_count", {"phase": "upload"}
    )
    result = restore_snapshot(
        path, tenant_uid=UID, module_sha256=module.sha256, pool=dst.pool, device=dst.device
    )
    # decode runs inside "verify" (one task per chunk: read, check, decode, upload)
    assert set(result.timings) == {"read", "verify", "upload", "instantiate", "total"}
    after = metrics.REGISTRY.get_sample_value(
        "tensorwasm_snapshot_restore_phase_seconds_count", {"phase": "upload"}
    )
    assert after == (before or 0) + 1


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other_tenant", "belongs to tenant uid"),
        ("other_module", "module sha256"),
        ("gpu_over_cap", "over the tenant's cap"),
        ("memory_over_limit", "over the tenant's linear memory limit"),
    ],
)
def test_foreign_or_oversized_snapshots_are_refused_and_change_nothing(
    case: str, message: str, engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    src = make_tenant(engine, module, accel, "src")
    randomize(src, random.Random(11), maximal=True)
    path = capture(SnapshotStore(tmp_path), src)
    cap = GPU_CAP // 2 if case == "gpu_over_cap" else GPU_CAP
    limit = MEMORY_LIMIT // 2 if case == "memory_over_limit" else MEMORY_LIMIT
    dst = make_tenant(engine, module, accel, "dst", cap=cap, memory_limit=limit)
    randomize(dst, random.Random(12))
    before = snapshot_of(dst)
    uid = "someone-else" if case == "other_tenant" else UID
    digest = "00" * 32 if case == "other_module" else None
    with pytest.raises(SnapshotRejected, match=message):
        restore(path, dst, uid=uid, module_sha256=digest)
    assert snapshot_of(dst) == before


def test_gpu_snapshot_into_a_tenant_without_gpu_is_refused(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    src = make_tenant(engine, module, accel, "src")
    randomize(src, random.Random(5), maximal=True)
    path = capture(SnapshotStore(tmp_path), src)
    pool = TenantInstancePool(engine, module, GuestLimits(memory_bytes=MEMORY_LIMIT), tenant_id="nogpu")
    with pytest.raises(SnapshotRejected, match="no GPU access"):
        restore_snapshot(path, tenant_uid=UID, module_sha256=module.sha256, pool=pool)


def test_1000_damaged_blobs_are_refused_and_leave_the_tenant_untouched(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    src = make_tenant(engine, module, accel, "src")
    randomize(src, random.Random(21))
    good = capture(SnapshotStore(tmp_path / "store"), src, chunk_size=16 << 10).read_bytes()
    dst = make_tenant(engine, module, accel, "dst")
    randomize(dst, random.Random(22))
    before = snapshot_of(dst)
    rng = random.Random(23)
    damaged_path = tmp_path / "damaged.twsnap"
    refused = 0
    for i in range(1100):
        blob = bytearray(good)
        if i % 10 == 0:
            blob = blob[: rng.randrange(len(blob))]  # truncation
        else:
            blob[rng.randrange(len(blob))] ^= rng.randrange(1, 256)
        damaged_path.write_bytes(blob)
        with pytest.raises(SnapshotRejected) as info:
            restore(damaged_path, dst)
        assert info.value.message.startswith("snapshot")
        refused += 1
        if i % 50 == 0:  # full state comparison is the slow part; the GPU + wasm baseline are checked often
            assert snapshot_of(dst) == before
    assert refused >= 1000
    assert snapshot_of(dst) == before
    damaged_path.write_bytes(good)
    restore(damaged_path, dst)  # and the undamaged blob still restores
    assert snapshot_of(dst) == snapshot_of(src)


def test_latest_good_snapshot_restores_after_an_interrupted_capture(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    store = SnapshotStore(tmp_path)
    src = make_tenant(engine, module, accel, "src")
    randomize(src, random.Random(31))
    capture(store, src, generation=1)
    expected = snapshot_of(src)
    pending = store.begin(UID)  # a capture that died mid-write: bytes but no commit
    pending.pwrite(b"\x89TWSNP\r\n" + bytes(500), 0)
    latest = store.latest(UID)
    assert latest is not None and latest.manifest.generation == 1
    dst = make_tenant(engine, module, accel, "dst")
    restore(latest.path, dst)
    assert snapshot_of(dst) == expected
    assert codec.parse(latest.path.read_bytes()).digest == latest.digest


def test_restore_latest_skips_a_blob_it_must_refuse_and_restores_the_older_good_one(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    store = SnapshotStore(tmp_path)
    src = make_tenant(engine, module, accel, "src")
    randomize(src, random.Random(41))
    capture(store, src, generation=1)
    expected = snapshot_of(src)
    newer = capture(store, src, generation=2)
    data = bytearray(newer.read_bytes())
    data[100] ^= 0xFF  # the newest blob is damaged on disk
    newer.write_bytes(bytes(data))
    dst = make_tenant(engine, module, accel, "dst")
    result = restore_latest(
        store, tenant_uid=UID, module_sha256=module.sha256, pool=dst.pool, device=dst.device
    )
    assert result is not None and result.manifest.generation == 1
    assert snapshot_of(dst) == expected
    assert restore_latest(store, tenant_uid="nobody", module_sha256=module.sha256, pool=dst.pool) is None


_BIG_WAT = b"""(module
  (memory (export "memory") 8)
  (global $calls (export "calls") (mut i32) (i32.const 0))
  (func (export "tw_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "bump") (param i32 i32) (result i64)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (i32.store (i32.const 64) (i32.add (i32.load (i32.const 64)) (i32.const 1)))
    (i32.store (i32.const 2048) (global.get $calls))
    (i32.store (i32.const 2052) (i32.load (i32.const 64)))
    (i64.const 0x0000_0800_0000_0008)))"""


def _spawns(tenant: str) -> float:
    return float(metrics.INSTANCE_SPAWNS.labels(tenant=tenant)._value.get())


def _big_state(pages: int, counter: int, calls: int) -> WasmState:
    memory = bytearray(pages * PAGE)
    memory[64:68] = struct.pack("<i", counter)
    memory[-8:] = b"tail-end"
    return WasmState(memory=bytes(memory), globals=[("calls", "i32", calls)])


def test_restore_loads_held_instances_in_place_and_replaces_only_those_that_cannot_shrink(
    engine: Engine,
) -> None:
    # 8 pristine pages: the pool resets by dropping pages (back to the module's zeros), which the
    # restored baseline must switch off, or the next invoke would see zeros instead of the snapshot.
    module = compile_bytes(engine, _BIG_WAT)
    tenant = "in-place"
    pool = TenantInstancePool(engine, module, GuestLimits(memory_bytes=MEMORY_LIMIT, max_instances=3),
                              tenant_id=tenant)  # fmt: skip
    try:
        assert struct.unpack("<2i", pool.invoke("bump", b"")) == (1, 1)
        before = _spawns(tenant)
        for pages, counter in ((8, 40), (12, 50)):  # same size, then grown: no instance is spawned
            pool.restore_state(_big_state(pages, counter, calls=counter))
            assert _spawns(tenant) == before
            for _ in range(6):  # every instance, after reset, starts from the restored state
                assert struct.unpack("<2i", pool.invoke("bump", b"")) == (counter + 1, counter + 1)
            assert bytes(pool.capture_state().memory) == _big_state(pages, counter, counter).memory
        pool.restore_state(_big_state(8, 60, calls=60))  # memory cannot shrink: fresh instances
        assert _spawns(tenant) == before + 3
        for _ in range(6):
            assert struct.unpack("<2i", pool.invoke("bump", b"")) == (61, 61)
    finally:
        pool.close()
