"""The snapshot hot tier on the CPU backend: hits are bit-exact, pressure evicts LRU, a damaged entry is
refused and never reaches the tenant, and a restore holding an entry is safe from eviction."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.runtime import metrics
from tensorwasm.runtime.accel.cpu import CpuAccelerator
from tensorwasm.runtime.engine import CompiledModule, Engine, WasmState
from tensorwasm.runtime.errors import SnapshotRejected
from tensorwasm.runtime.snapshots.capture import CaptureResult, capture_snapshot
from tensorwasm.runtime.snapshots.hot_tier import ALIGN, Arena, HotTier, chunk_seal
from tensorwasm.runtime.snapshots.restore import RestoreResult, restore_snapshot
from tensorwasm.runtime.snapshots.store import SnapshotStore
from tests.unit.test_snapshot_restore import (  # the fixtures `accel` and `module` come with them
    UID,
    Tenant,
    accel,
    make_tenant,
    module,
    randomize,
    snapshot_of,
)

__all__ = ["accel", "module"]  # fixtures pytest finds by name in this module

MiB = 1 << 20


def lookups(result: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value("tensorwasm_snapshot_hot_tier_lookups_total", {"result": result})
        or 0
    )


def capture(store: SnapshotStore, t: Tenant, tier: HotTier, uid: str = UID) -> CaptureResult:
    return capture_snapshot(
        store, tenant_uid=uid, module_sha256=t.module.sha256, generation=1, pool=t.pool, device=t.device,
        chunk_size=64 << 10, hot=tier,
    )  # fmt: skip


def restore(path: Path, t: Tenant, tier: HotTier, uid: str = UID, **kw: Any) -> RestoreResult:
    return restore_snapshot(
        path, tenant_uid=uid, module_sha256=t.module.sha256, pool=t.pool, device=t.device, hot=tier, **kw
    )


def tier_of(nbytes: int) -> HotTier:
    return HotTier(nbytes, lambda n: memoryview(bytearray(n)))


def test_arena_is_first_fit_and_coalesces() -> None:
    arena = Arena(10 * ALIGN)
    a, b, c = arena.alloc(3 * ALIGN), arena.alloc(3 * ALIGN), arena.alloc(3 * ALIGN)
    assert (a, b, c) == (0, 3 * ALIGN, 6 * ALIGN)
    assert a is not None and b is not None and c is not None
    assert arena.alloc(2 * ALIGN) is None  # one page left
    arena.free(a, 3 * ALIGN)
    arena.free(c, 3 * ALIGN)
    assert arena.alloc(5 * ALIGN) is None  # 3 + 4 pages free, never adjacent
    arena.free(b, 3 * ALIGN)
    assert arena.free_bytes == 10 * ALIGN
    assert arena.alloc(10 * ALIGN) == 0  # all three ranges merged back into one
    with pytest.raises(ValueError):
        arena.free(0, ALIGN)
        arena.free(0, ALIGN)


def test_seal_catches_one_flipped_bit_anywhere() -> None:
    data = bytearray(random.Random(1).randbytes(4099))  # a ragged tail too
    base = chunk_seal(memoryview(data))
    for at in (0, 7, 8, 2048, 4095, 4098):
        data[at] ^= 0x10
        assert chunk_seal(memoryview(data)) != base
        data[at] ^= 0x10
    assert chunk_seal(memoryview(data)[:-1]) != base


def test_capture_enters_the_tier_and_restore_is_a_bit_exact_hit(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    tier = tier_of(64 * MiB)
    src = make_tenant(engine, module, accel, "src")
    randomize(src, random.Random(2))
    shot = capture(SnapshotStore(tmp_path), src, tier)
    assert shot.hot and shot.digest in tier
    dst = make_tenant(engine, module, accel, "dst")
    randomize(dst, random.Random(3))
    hits = lookups("hit")
    result = restore(shot.path, dst, tier)
    assert result.source == "hot" and lookups("hit") == hits + 1
    assert snapshot_of(dst) == snapshot_of(src)


def test_a_miss_restores_from_the_file_and_fills_the_tier(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    src = make_tenant(engine, module, accel, "src")
    randomize(src, random.Random(4))
    shot = capture(SnapshotStore(tmp_path), src, tier_of(0))  # a tier of 0 bytes holds nothing
    assert not shot.hot
    tier = tier_of(64 * MiB)
    dst = make_tenant(engine, module, accel, "dst")
    misses = lookups("miss")
    assert restore(shot.path, dst, tier).source == "file" and lookups("miss") == misses + 1
    assert shot.digest in tier
    again = make_tenant(engine, module, accel, "again")
    assert restore(shot.path, again, tier).source == "hot"
    assert snapshot_of(again) == snapshot_of(src) == snapshot_of(dst)


def test_pressure_evicts_the_least_recently_used_entry(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    store = SnapshotStore(tmp_path, retain=10)
    tenants, shots = [], []
    for i in range(3):
        t = make_tenant(engine, module, accel, f"t{i}", cap=None)
        t.pool.restore_state(
            WasmState(memory=bytes([i + 1]) * (4 * 65536), globals=t.pool.capture_state().globals)
        )
        t.device.write(t.device.alloc(3 * MiB), 0, bytes([i + 1]) * (3 * MiB))
        tenants.append(t)
    one = 3 * MiB + 4 * 65536 + 4096  # GPU buffer, memory, globals: each page-aligned
    tier = tier_of(2 * one + 4096)
    evictions = metrics.REGISTRY.get_sample_value("tensorwasm_snapshot_hot_tier_evictions_total") or 0
    shots = [capture(store, t, tier, uid=f"uid-{i}") for i, t in enumerate(tenants[:2])]
    restore(
        shots[0].path, make_tenant(engine, module, accel, "r0", cap=None), tier, uid="uid-0"
    )  # 0 used last
    shots.append(capture(store, tenants[2], tier, uid="uid-2"))
    assert tier.digests() == [shots[0].digest, shots[2].digest]  # 1 was least recently used
    assert metrics.REGISTRY.get_sample_value("tensorwasm_snapshot_hot_tier_evictions_total") == evictions + 1
    assert tier.used_bytes <= tier.max_bytes
    late = make_tenant(engine, module, accel, "late", cap=None)
    assert restore(shots[1].path, late, tier, uid="uid-1").source == "file"
    assert snapshot_of(late)[2] == snapshot_of(tenants[1])[2]


def test_a_damaged_entry_is_refused_dropped_and_never_reaches_the_tenant(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    tier = tier_of(64 * MiB)
    src = make_tenant(engine, module, accel, "src", cap=None)
    randomize(src, random.Random(5))
    handle = src.device.alloc(MiB)
    src.device.write(handle, 0, random.Random(6).randbytes(MiB))
    shot = capture(SnapshotStore(tmp_path), src, tier)
    with tier.lease(shot.digest) as entry:
        assert entry is not None
        entry.slot.view[100] ^= 0xFF  # one byte of the first GPU buffer, in pinned memory
    dst = make_tenant(engine, module, accel, "dst", cap=None)
    randomize(dst, random.Random(7))
    corrupt = lookups("corrupt")
    result = restore(shot.path, dst, tier)  # refused in the tier, then served from the file
    assert result.source == "file" and lookups("corrupt") == corrupt + 1
    assert snapshot_of(dst) == snapshot_of(src)
    # Without the file there is nothing to fall back on: refused, and the tenant is as it was.
    with tier.lease(shot.digest) as entry:
        assert entry is not None  # the file restore put a fresh copy back
        entry.slot.view[100] ^= 0xFF
    shot.path.unlink()
    other = make_tenant(engine, module, accel, "other", cap=None)
    randomize(other, random.Random(8))
    before, in_use = snapshot_of(other), other.device.bytes_in_use()
    with pytest.raises(SnapshotRejected):
        restore(shot.path, other, tier)
    assert snapshot_of(other) == before and other.device.bytes_in_use() == in_use
    assert shot.digest not in tier


def test_without_room_for_unpublished_buffers_the_restore_still_lands(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    tier = tier_of(64 * MiB)
    src = make_tenant(engine, module, accel, "src", cap=8 * MiB)
    randomize(src, random.Random(9), maximal=True)  # the whole cap in use
    shot = capture(SnapshotStore(tmp_path), src, tier)
    dst = make_tenant(engine, module, accel, "dst", cap=8 * MiB)
    randomize(dst, random.Random(10), maximal=True)  # no room beside these: uploads wait for the checks
    restore(shot.path, dst, tier)
    assert snapshot_of(dst) == snapshot_of(src) and dst.device.bytes_in_use() == 8 * MiB


def test_a_restore_holding_its_entry_survives_eviction(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    src = make_tenant(engine, module, accel, "src", cap=None)
    src.device.write(src.device.alloc(2 * MiB), 0, random.Random(11).randbytes(2 * MiB))
    tier = tier_of(3 * MiB)  # room for exactly one entry
    shot = capture(SnapshotStore(tmp_path), src, tier)
    seen: list[Any] = []

    def evict_meanwhile(memory: memoryview, globals_: list[Any]) -> WasmState:
        # Runs inside the restore after the checks, while the entry is leased: eviction by pressure
        # finds nothing it may take, and an explicit drop only unlists the entry.
        seen.append(tier.reserve(3 * MiB))
        tier.drop(shot.digest)
        seen.append(tier.reserve(3 * MiB))
        return WasmState(memory=bytes(memory), globals=globals_)

    dst = make_tenant(engine, module, accel, "dst", cap=None)
    restore(shot.path, dst, tier, make_state=evict_meanwhile)
    assert seen == [None, None]  # the leased range was never handed out
    assert snapshot_of(dst)[2] == snapshot_of(src)[2]
    assert shot.digest not in tier and tier.used_bytes == 0  # freed with the last lease
    assert tier.reserve(3 * MiB) is not None


def test_concurrent_restores_and_captures_under_eviction_stay_bit_exact(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    store = SnapshotStore(tmp_path, retain=50)
    sources = []
    for i in range(3):
        t = make_tenant(engine, module, accel, f"s{i}", cap=None)
        t.device.write(t.device.alloc(MiB), 0, random.Random(20 + i).randbytes(MiB))
        sources.append(t)
    tier = tier_of(3 * MiB)  # about two entries: every capture or miss evicts
    shots = [capture(store, t, tier, uid=f"uid-{i}") for i, t in enumerate(sources)]
    expected = [snapshot_of(t)[2] for t in sources]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for j in range(6):
                i = (k + j) % 3
                t = make_tenant(engine, module, accel, f"w{k}-{j}", cap=None)
                restore(shots[i].path, t, tier, uid=f"uid-{i}")
                assert snapshot_of(t)[2] == expected[i]
                accel.close_tenant(f"w{k}-{j}")
                t.pool.close()
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert tier.used_bytes <= tier.max_bytes


def test_device_word_sums_agree_with_the_host_seal(accel: CpuAccelerator) -> None:
    from tensorwasm.runtime.snapshots.hot_tier import seal_of

    dev = accel.open_tenant("sums", None)
    data = random.Random(12).randbytes(3 * 65536 + 5)
    h = dev.alloc(len(data))
    dev.write(h, 0, data)
    (sums,) = dev.word_sums([h], 65536)
    pieces = [data[at : at + 65536] for at in range(0, len(data), 65536)]
    assert [seal_of(s, len(p)) for s, p in zip(sums, pieces, strict=True)] == [
        chunk_seal(memoryview(p)) for p in pieces
    ]


def test_the_tier_is_sized_by_a_validated_setting(tmp_path: Path) -> None:
    from tensorwasm.runtime.settings import SettingsError, load_settings

    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants: []\n")
    base = ["--tenants-file", str(tenants)]
    assert load_settings(base, environ={}).snapshot_hot_tier_bytes == 1 << 30
    env = {"TENSORWASM_RUNTIME_SNAPSHOT_HOT_TIER_BYTES": "0"}
    assert load_settings(base, environ=env).snapshot_hot_tier_bytes == 0
    with pytest.raises(SettingsError, match="--snapshot-hot-tier-bytes"):
        load_settings([*base, "--snapshot-hot-tier-bytes", "-1"], environ={})
