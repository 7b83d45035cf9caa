"""Restore a tenant from a snapshot blob: verify everything first, then a pipelined load.

Owns the restore pipeline and its refusal rules. Phases (each a histogram sample):
  read        mmap the blob, parse header + manifest, check the root checksum
  verify      bind to tenant uid + module digest, check caps, xxh3 of every chunk on the workers
  decompress  decode chunks in parallel straight into (pinned) staging
  upload      GPU: restore_buffers, then an async H2D per chunk as soon as it is decoded (overlapped
              with the remaining decompression); this phase is the tail until the stream is synced
  instantiate wasm memory + globals written into the pool's instances
Nothing of the tenant changes until `read` and `verify` pass: a refused blob leaves state untouched.
Must not import wasmtime or cuda; reaches the engine and accelerator through their protocols.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorwasm.runtime import metrics
from tensorwasm.runtime.accel.base import Accelerator, TenantDevice
from tensorwasm.runtime.errors import GpuMemoryExhausted, SnapshotRejected
from tensorwasm.runtime.snapshots import codec
from tensorwasm.runtime.snapshots.pipeline import STAGING, SnapshotPool, Stopwatch, layout, workers
from tensorwasm.runtime.snapshots.store import open_blob

WASM_PAGE = 65536


@dataclass(frozen=True)
class RestoreResult:
    """What was restored and what each phase cost (seconds)."""

    digest: str
    manifest: codec.Manifest
    timings: dict[str, float]


def check_binding(
    manifest: codec.Manifest,
    *,
    tenant_uid: str,
    module_sha256: str,
    device: TenantDevice | None,
    memory_limit: int | None,
) -> None:
    """Refuse a blob that is not this tenant's, not this module's, or does not fit the current caps."""
    if manifest.tenant_uid != tenant_uid:
        raise SnapshotRejected(
            f"snapshot belongs to tenant uid {manifest.tenant_uid!r}, not {tenant_uid!r}",
            reason="TenantMismatch",
        )
    if manifest.module_sha256 != module_sha256:
        raise SnapshotRejected(
            f"snapshot was taken with module sha256 {manifest.module_sha256}; tenant runs {module_sha256}",
            reason="ModuleMismatch",
        )
    memory = manifest.region("wasm_memory").size
    if memory % WASM_PAGE:
        raise SnapshotRejected(f"snapshot wasm memory of {memory} bytes is not whole 64 KiB pages")
    if memory_limit is not None and memory > memory_limit:
        raise SnapshotRejected(
            f"snapshot wasm memory is {memory} bytes, over the tenant's linear memory limit {memory_limit}",
            reason="OverCap",
        )
    gpu = manifest.gpu_buffers()
    if gpu and device is None:
        raise SnapshotRejected("snapshot holds GPU buffers; the tenant has no GPU access", reason="OverCap")
    cap = device.cap_bytes if device is not None else None
    if cap is not None and sum(gpu.values()) > cap:
        raise SnapshotRejected(
            f"snapshot holds {sum(gpu.values())} bytes of GPU buffers, over the tenant's cap of {cap} bytes "
            "(a snapshot is never truncated)",
            reason="OverCap",
        )


def check_pool(pool: SnapshotPool, memory_bytes: int, globals_: list[codec.GlobalValue]) -> None:
    """What the engine would refuse in restore_state, checked before the GPU side changes anything."""
    limit = getattr(getattr(pool, "limits", None), "memory_bytes", None)
    if isinstance(limit, int) and memory_bytes > limit:
        raise SnapshotRejected(
            f"snapshot wasm memory is {memory_bytes} bytes, over the tenant's linear memory limit {limit}",
            reason="OverCap",
        )
    floor = getattr(getattr(pool, "module", None), "min_memory_bytes", None)
    if isinstance(floor, int) and memory_bytes < floor:
        raise SnapshotRejected(f"snapshot wasm memory of {memory_bytes} bytes is below the module's {floor}")
    current = pool.capture_state()  # the baseline; reentrant inside the barrier
    want = sorted((name, vt) for name, vt, _ in current.globals)
    got = sorted((name, vt) for name, vt, _ in globals_)
    if want != got:
        raise SnapshotRejected(f"snapshot globals {got} do not match the module's mutable globals {want}")


def restore_snapshot(
    path: Path,
    *,
    tenant_uid: str,
    module_sha256: str,
    pool: SnapshotPool,
    device: TenantDevice | None = None,
    accelerator: Accelerator | None = None,
    memory_limit: int | None = None,
    make_state: Callable[[memoryview, list[codec.GlobalValue]], Any] | None = None,
) -> RestoreResult:
    """Verify `path` completely, then load it into `pool` and `device`; SnapshotRejected if refused."""
    watch = Stopwatch()
    try:
        with open_blob(path) as blob:
            parsed = codec.parse(blob)
            m = parsed.manifest
            watch.lap("read")
            check_binding(m, tenant_uid=tenant_uid, module_sha256=module_sha256, device=device,
                          memory_limit=memory_limit)  # fmt: skip
            _verify_chunks(blob, m)
            globals_ = codec.decode_globals(codec.decode_region(blob, m, m.region("globals")))
            watch.lap("verify")
            _load(blob, m, watch, pool, device, accelerator, globals_, make_state or _wasm_state)
    except SnapshotRejected:
        metrics.SNAPSHOT_REJECTED.inc()
        raise
    timings = watch.total()
    for phase, seconds in timings.items():
        metrics.SNAPSHOT_RESTORE_PHASE_SECONDS.labels(phase).observe(seconds)
    metrics.SNAPSHOT_BYTES.labels("restore", "raw").inc(m.raw_bytes)
    metrics.SNAPSHOT_BYTES.labels("restore", "stored").inc(parsed.file_length)
    return RestoreResult(parsed.digest, m, timings)


def _verify_chunks(blob: memoryview, m: codec.Manifest) -> None:
    # Small blobs: thread hand-off costs more than hashing a few MiB at ~16 GB/s.
    if m.stored_bytes <= 8 << 20:
        for i in range(len(m.chunks)):
            codec.verify_chunk(blob, m, i)
        return
    futures = [workers().submit(codec.verify_chunk, blob, m, i) for i in range(len(m.chunks))]
    for f in futures:
        f.result()


def _load(
    blob: memoryview,
    m: codec.Manifest,
    watch: Stopwatch,
    pool: SnapshotPool,
    device: TenantDevice | None,
    accelerator: Accelerator | None,
    globals_: list[codec.GlobalValue],
    make_state: Callable[[memoryview, list[codec.GlobalValue]], Any],
) -> None:
    gpu_regions = list(codec.iter_gpu_regions(m))
    memory_region = m.region("wasm_memory")
    targets = [*gpu_regions, memory_region]
    offsets = layout([r.size for r in targets])
    with pool.quiesce(), STAGING.acquire(accelerator, offsets[-1]) as stage:
        check_pool(pool, memory_region.size, globals_)
        if device is not None:
            try:
                device.restore_buffers(m.gpu_buffers())  # all-or-nothing: the first state change
            except GpuMemoryExhausted as exc:
                raise SnapshotRejected(
                    f"snapshot GPU buffers do not fit the tenant's cap: {exc.message}", reason="OverCap"
                ) from exc
        jobs: dict[cf.Future[None], tuple[codec.Region, int, memoryview]] = {}
        for region, base in zip(targets, offsets, strict=False):
            for j in range(region.chunk_count):
                c = m.chunks[region.first_chunk + j]
                start = j * m.chunk_size
                dst = stage[base + start : base + start + c.size]
                jobs[workers().submit(codec.decode_chunk_into, blob, c, dst)] = (region, start, dst)
        for fut in cf.as_completed(jobs):
            fut.result()
            region, start, dst = jobs[fut]
            if region.handle is not None and device is not None:
                device.write_async(region.handle, start, dst)  # H2D overlaps the chunks still decoding
        watch.lap("decompress")
        if device is not None:
            device.sync()
        watch.lap("upload")
        base = offsets[len(gpu_regions)]
        pool.restore_state(make_state(stage[base : base + memory_region.size], globals_))
        watch.lap("instantiate")


def _wasm_state(memory: memoryview, globals_: list[codec.GlobalValue]) -> Any:
    # Imported here: the engine module pulls in wasmtime, which snapshots must not import at module level.
    from tensorwasm.runtime.engine import WasmState

    return WasmState(memory=memory, globals=globals_)
