"""Snapshot capture and restore-to-ready vs the naive path and the physical floor, in one run.

For each content ("weights": random float32, barely compressible; "half_zero": float32 with every
other 64 KiB block zeroed, ~2x compressible) and size (1, 16, 128, 512 MiB of tenant state: wasm
linear memory = a quarter, at most 1 MiB; the rest in 1-4 GPU buffers), on the real engine and the
best accelerator here:
- hot: restore_snapshot() served by the pinned hot tier (the capture put it there): seals checked
  per chunk while each chunk is uploaded into unpublished buffers, published at the barrier;
- ours (file): restore_snapshot() of a blob from the store, page cache warm, no hot tier: pread +
  CRC-32 + decode per chunk on the worker threads into pinned staging, each chunk uploaded into
  unpublished buffers as soon as it passed, wasm memory into the pool; P50 of several runs;
- miss: the same from the file, decoding into a fresh hot-tier slot and sealing it (the next is a hit);
- naive: the same state as ONE zstd level-3 frame: read() the file, decompress on one thread,
  pageable device.write per buffer, then pool.restore_state;
- floor: CUDA: one pinned host-to-device copy of the GPU bytes (write_async from pinned staging +
  sync); CPU: one memcpy of all the state's bytes between two warm buffers;
- pread floor: the blob file pread into pinned staging in 4 MiB pieces on the same worker threads
  (page cache -> pinned, nothing checked): the file path's copy floor is pread floor + H2D floor;
- checksums: CRC-32 (the blob's), the hot tier's word-sum seal and xxh3 (when importable) over the
  512 MiB case's bytes on the worker threads, GB/s.
Capture: capture_snapshot() into the store, fsync included. Sizes: TENSORWASM_BENCH_SNAPSHOT_SIZES.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

MiB = 1 << 20
PAGE = 64 << 10
MODULE_WAT = b"""(module
  (memory (export "memory") 1)
  (global $g (export "g") (mut i64) (i64.const 0))
  (func (export "tw_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "noop") (param i32 i32) (result i64) (i64.const 0)))"""
GPU_TARGETS_MS = {1: 2.0, 16: 5.0, 128: 25.0, 512: 80.0}
UID = "bench-snapshot-tenant"


def _content(kind: str, nbytes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(nbytes // 4, dtype=np.float32).view(np.uint8)
    if kind == "half_zero":
        blocks = data[: len(data) // (2 * PAGE) * 2 * PAGE].reshape(-1, 2, PAGE)
        blocks[:, 1, :] = 0
    return data


def _p50(fn: Callable[[], Any], reps: int, warm: int = 1) -> tuple[float, list[Any]]:
    for _ in range(warm):
        fn()
    times, results = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, results


def _reps(size_mib: int) -> int:
    return 30 if size_mib <= 1 else 15 if size_mib <= 16 else 7 if size_mib <= 128 else 5


class _Case:
    """One tenant state on the accelerator plus an empty twin to restore into."""

    def __init__(self, acc: Any, engine: Any, module: Any, kind: str, size_mib: int, tag: str) -> None:
        from tensorwasm.runtime.engine import GuestLimits, TenantInstancePool, WasmState

        total = size_mib * MiB
        self.wasm_bytes = max(PAGE, min(total // 4, MiB) // PAGE * PAGE)
        gpu_total = total - self.wasm_bytes
        n = 1 if size_mib <= 1 else 4
        self.sizes = [gpu_total // n] * (n - 1) + [gpu_total - gpu_total // n * (n - 1)]
        limits = GuestLimits(memory_bytes=max(self.wasm_bytes, 1 * MiB))
        cap = total * 2 + 64 * MiB
        self.src_dev = acc.open_tenant(f"src-{tag}", cap)
        self.dst_dev = acc.open_tenant(f"dst-{tag}", cap)
        self.src = TenantInstancePool(engine, module, limits, device=self.src_dev, tenant_id=f"src-{tag}")
        self.dst = TenantInstancePool(engine, module, limits, device=self.dst_dev, tenant_id=f"dst-{tag}")
        self.memory = _content(kind, self.wasm_bytes, 1).tobytes()
        self.globals: list[tuple[str, str, int | float]] = [
            (name, vt, 7) for name, vt, _ in self.src.capture_state().globals
        ]
        self.src.restore_state(WasmState(memory=self.memory, globals=self.globals))
        self.gpu: dict[int, np.ndarray] = {}
        for i, size in enumerate(self.sizes):
            handle = self.src_dev.alloc(size)
            data = _content(kind, size, 10 + i)
            self.src_dev.write(handle, 0, memoryview(data.data))
            self.gpu[handle] = data
        self.src_dev.sync()

    def check(self) -> None:
        """The restored twin equals the source (outside the timed region)."""
        assert bytes(self.dst.capture_state().memory) == self.memory
        for handle, data in self.gpu.items():
            got = np.frombuffer(self.dst_dev.read(handle, 0, len(data)), dtype=np.uint8)
            assert np.array_equal(got, data), f"GPU buffer {handle} differs after restore"

    def close(self, acc: Any) -> None:
        self.src.close()
        self.dst.close()
        acc.close_tenant(self.src_dev.tenant_id)
        acc.close_tenant(self.dst_dev.tenant_id)


def _naive_blob(case: _Case, path: Path) -> None:
    whole = b"".join([case.memory, *(d.tobytes() for d in case.gpu.values())])
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(whole))


def _naive_restore(case: _Case, path: Path) -> None:
    from tensorwasm.runtime.engine import WasmState

    with open(path, "rb") as f:
        packed = f.read()
    raw = memoryview(zstandard.ZstdDecompressor().decompress(packed))
    case.dst_dev.restore_buffers({h: len(d) for h, d in case.gpu.items()})
    at = case.wasm_bytes
    for handle, data in case.gpu.items():
        case.dst_dev.write(handle, 0, raw[at : at + len(data)])
        at += len(data)
    case.dst_dev.sync()
    case.dst.restore_state(WasmState(memory=raw[: case.wasm_bytes], globals=case.globals))


def _disk_floor(directory: Path, nbytes: int) -> Callable[[], None]:
    """Durable-write floor for capture: one write of the blob's size from warm memory, then fsync."""
    data = memoryview(np.ones(nbytes, dtype=np.uint8).data)
    target = directory / "disk-floor.bin"

    def write() -> None:
        fd = os.open(target, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        try:
            done = 0
            while done < nbytes:
                done += os.write(fd, data[done:])
            os.fsync(fd)
        finally:
            os.close(fd)
            target.unlink()

    return write


def _floor(acc: Any, case: _Case) -> Callable[[], None]:
    if acc.name == "cuda":
        gpu_bytes = sum(case.sizes)
        stage = acc.pinned_buffer(gpu_bytes)
        case.dst_dev.restore_buffers({h: len(d) for h, d in case.gpu.items()})

        def h2d() -> None:
            at = 0
            for handle, data in case.gpu.items():
                case.dst_dev.write_async(handle, 0, stage[at : at + len(data)])
                at += len(data)
            case.dst_dev.sync()

        return h2d
    total = case.wasm_bytes + sum(case.sizes)
    src = np.ones(total, dtype=np.uint8)
    dst = np.ones(total, dtype=np.uint8)
    return lambda: np.copyto(dst, src)


def _pread_floor(acc: Any, path: Path, nbytes: int) -> Callable[[], None]:
    """Page cache -> pinned staging, 4 MiB pieces on the snapshot worker threads, nothing checked."""
    from tensorwasm.runtime.snapshots.pipeline import STAGING, workers

    piece = 4 * MiB

    def read() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            with STAGING.turn(acc if acc.name == "cuda" else None) as staging:
                stage = staging.view(nbytes)

                def one(at: int) -> None:
                    os.preadv(fd, [stage[at : at + piece]], at)

                if nbytes <= piece:
                    one(0)
                else:
                    list(workers().map(one, range(0, nbytes, piece)))
        finally:
            os.close(fd)

    return read


def piece_rates(
    data: np.ndarray, fns: dict[str, Callable[[memoryview], Any]], digits: int = 1
) -> dict[str, float]:
    """GB/s of each of `fns` over `data` in 4 MiB pieces on the worker threads (best of 3): the
    floor a snapshot path that runs it over every stored byte cannot beat."""
    from tensorwasm.runtime.snapshots.pipeline import workers

    view = memoryview(data.data)
    piece = 4 * MiB
    rates = {}
    for name, fn in fns.items():
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            list(workers().map(lambda at, fn=fn: fn(view[at : at + piece]), range(0, len(view), piece)))
            best = min(best, time.perf_counter() - t0)
        rates[name] = round(len(view) / best / 1e9, digits)
    return rates


def _checksum_rates(data: np.ndarray) -> dict[str, float]:
    """GB/s of each checksum over `data` in 4 MiB pieces on the worker threads (best of 3)."""
    import zlib

    from tensorwasm.runtime.snapshots.hot_tier import chunk_seal

    fns: dict[str, Callable[[memoryview], Any]] = {"crc32": zlib.crc32, "word_sum_seal": chunk_seal}
    try:
        import xxhash

        fns["xxh3_64"] = xxhash.xxh3_64_intdigest
    except ImportError:
        pass
    return piece_rates(data, fns)


def run() -> dict[str, Any]:
    from tensorwasm.runtime.accel import select_accelerator
    from tensorwasm.runtime.engine import Engine
    from tensorwasm.runtime.snapshots.capture import capture_snapshot
    from tensorwasm.runtime.snapshots.hot_tier import HotTier
    from tensorwasm.runtime.snapshots.restore import restore_snapshot
    from tensorwasm.runtime.snapshots.store import SnapshotStore

    sizes = [int(s) for s in os.environ.get("TENSORWASM_BENCH_SNAPSHOT_SIZES", "1,16,128,512").split(",")]
    acc = select_accelerator(os.environ.get("TENSORWASM_BENCH_ACCELERATOR", "auto"))
    gpu = acc.name == "cuda"
    work = Path(tempfile.mkdtemp(prefix="tw-bench-snapshot-"))
    engine = Engine(cache_dir=work / "cache")
    import hashlib

    module = engine.compile(MODULE_WAT, hashlib.sha256(MODULE_WAT).hexdigest())
    store = SnapshotStore(work / "store", retain=1)
    # Room for the largest case twice over (its capture and the slot a miss decodes into).
    tier = HotTier((max(sizes) * 2 + 64) * MiB, acc.host_region)
    figures: dict[str, float] = {}
    targets: dict[str, str] = {}
    rows = []
    checksums: dict[str, float] = {}
    try:
        for kind in ("weights", "half_zero"):
            for size in sizes:
                tag = f"{kind}-{size}"
                case = _Case(acc, engine, module, kind, size, tag)
                reps = _reps(size)

                def capture(case: _Case = case) -> Any:
                    return capture_snapshot(
                        store, tenant_uid=UID, module_sha256=module.sha256, generation=1, pool=case.src,
                        device=case.src_dev, accelerator=acc, hot=tier,
                    )  # fmt: skip

                capture_ms, caps = _p50(capture, max(3, reps // 3))
                barrier_ms = statistics.median(c.timings["barrier"] for c in caps) * 1e3
                blob = caps[-1]
                assert blob.hot, "the capture did not enter the hot tier"
                store.gc()
                disk_ms, _ = _p50(_disk_floor(work, blob.size_bytes), 3)

                def restore(case: _Case = case, path: Path = blob.path, hot: Any = None) -> Any:
                    return restore_snapshot(
                        path, tenant_uid=UID, module_sha256=module.sha256, pool=case.dst, device=case.dst_dev,
                        accelerator=acc, hot=hot,
                    )  # fmt: skip

                hot_ms, hot_results = _p50(lambda: restore(hot=tier), reps, warm=2)
                assert all(r.source == "hot" for r in hot_results)
                case.check()

                def miss(digest: str = blob.digest) -> Any:
                    tier.drop(digest)  # the restore decodes into a fresh slot and seals it again
                    return restore(hot=tier)

                miss_ms, _ = _p50(miss, max(3, reps // 2))
                case.check()
                ours_ms, results = _p50(restore, reps, warm=2)  # no tier: the file path alone
                assert all(r.source == "file" for r in results)
                case.check()
                phases = {
                    p: statistics.median(r.timings.get(p, 0.0) for r in results) * 1e3
                    for p in ("read", "verify", "upload", "instantiate")
                }
                hot_phases = {
                    p: statistics.median(r.timings.get(p, 0.0) for r in hot_results) * 1e3
                    for p in ("verify", "upload", "instantiate")
                }
                pread_ms, _ = _p50(_pread_floor(acc, blob.path, blob.size_bytes), reps, warm=2)
                naive_path = work / f"naive-{tag}.zst"
                _naive_blob(case, naive_path)

                def naive(c: _Case = case, p: Path = naive_path) -> None:
                    _naive_restore(c, p)

                naive_ms, _ = _p50(naive, max(3, reps // 3))
                case.check()
                naive_path.unlink()
                floor_ms, _ = _p50(_floor(acc, case), reps, warm=2)
                if size == max(sizes) and kind == "weights":
                    checksums = _checksum_rates(case.gpu[next(iter(case.gpu))])
                key = f"{kind}_{size}MiB"
                file_floor = pread_ms + floor_ms
                figures[f"hot_restore_p50_ms_{key}"] = round(hot_ms, 3)
                figures[f"hot_over_floor_{key}"] = round(hot_ms / floor_ms, 2)
                figures[f"hot_target_ms_{key}"] = round(1.5 * floor_ms + 0.5, 3)
                figures[f"restore_p50_ms_{key}"] = round(ours_ms, 3)
                figures[f"miss_restore_p50_ms_{key}"] = round(miss_ms, 3)
                figures[f"naive_p50_ms_{key}"] = round(naive_ms, 3)
                figures[f"floor_p50_ms_{key}"] = round(floor_ms, 3)
                figures[f"pread_floor_p50_ms_{key}"] = round(pread_ms, 3)
                figures[f"restore_over_file_floor_{key}"] = round(ours_ms / file_floor, 2)
                figures[f"restore_over_floor_{key}"] = round(ours_ms / floor_ms, 2)
                figures[f"speedup_vs_naive_{key}"] = round(naive_ms / ours_ms, 2)
                figures[f"capture_p50_ms_{key}"] = round(capture_ms, 2)
                # Reported apart: how long the tenant is paused (quiesce .. clone or D2H .. resume) and
                # how long until the blob is durable (== capture_p50; bounded below by the disk floor).
                figures[f"capture_paused_p50_ms_{key}"] = round(barrier_ms, 2)
                figures[f"capture_durable_p50_ms_{key}"] = round(capture_ms, 2)
                figures[f"capture_durable_over_disk_floor_{key}"] = round(capture_ms / disk_ms, 2)
                figures[f"capture_disk_floor_p50_ms_{key}"] = round(disk_ms, 2)
                targets[f"hot_restore_p50_ms_{key}"] = f"<= {1.5 * floor_ms + 0.5:.3f}"
                targets[f"restore_over_file_floor_{key}"] = "<= 2"
                if gpu and size in GPU_TARGETS_MS:
                    targets[f"restore_p50_ms_{key}"] = f"<= {GPU_TARGETS_MS[size]:g}"
                if gpu and size == 512:
                    targets[f"capture_paused_p50_ms_{key}"] = "<= 5"
                stored = blob.size_bytes / MiB
                rows.append(
                    f"| {kind} | {size} | {hot_ms:.2f} | {floor_ms:.2f} | {hot_ms / floor_ms:.2f}x | "
                    f"{ours_ms:.2f} | {pread_ms:.2f} + {floor_ms:.2f} | {ours_ms / file_floor:.2f}x | "
                    f"{miss_ms:.2f} | {naive_ms:.1f} | "
                    f"{barrier_ms:.2f} / {capture_ms:.1f} | {disk_ms:.1f} | {stored:.1f} | "
                    + " / ".join(f"{phases[p]:.2f}" for p in phases)
                    + " | "
                    + " / ".join(f"{hot_phases[p]:.2f}" for p in hot_phases)
                    + " |"
                )
                case.close(acc)
    finally:
        engine.close()
        acc.close()
        shutil.rmtree(work, ignore_errors=True)
    for name, rate in checksums.items():
        figures[f"checksum_{name}_gbps"] = rate
    floor_name = "pinned H2D memcpy of the GPU bytes" if gpu else "one memcpy of the state's bytes"
    table = (
        "| content | MiB | hot P50 ms | H2D floor ms | hot/floor | file P50 ms | pread + H2D floor ms | "
        "file/floor | miss (fills tier) ms | naive ms | capture paused / durable ms | disk floor ms | "
        "stored MiB | file: read / verify / upload / instantiate ms | "
        "hot: verify / upload / instantiate ms |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    return {
        "title": f"Snapshot restore to ready and capture ({'H200, CUDA backend' if gpu else 'CPU backend'})",
        "figures": figures,
        "targets": targets,
        "table": table,
        "notes": (
            f"Accelerator: {acc.name}. Floor = {floor_name}; pread floor = the blob pread from the page "
            "cache into pinned staging on the worker threads. hot = served by the pinned hot tier (seals "
            "checked while each chunk is uploaded into unpublished buffers; target 1.5x floor + 0.5 ms). "
            "file = page cache, no tier (pread + CRC-32 + decode per chunk, uploads overlapped the same way; "
            "target 2x (pread floor + floor)). miss = file path decoding into a fresh tier slot plus seals. "
            "Naive = one zstd-3 frame, read(), one-thread decompress, pageable writes. Restore is to ready: "
            "GPU buffers published and wasm memory + globals loaded in place into every warm instance (4). "
            "Capture: paused = the barrier (pool quiesce + device-side clone of the GPU buffers + wasm "
            "memory copy), durable = until fsynced (disk floor: one write() of the blob's size + fsync). "
            f"Checksum rates on {os.cpu_count()} cores' worker threads over the largest case's first buffer."
        ),
    }
