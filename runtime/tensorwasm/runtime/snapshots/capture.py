"""Capture a tenant's live state into the store at one barrier.

Owns the capture pipeline: quiesce the instance pool (no invoke in flight) and sync the tenant's GPU
stream, copy wasm memory, globals and every GPU buffer (by handle) into host staging, release the
barrier, then compress + checksum chunks on the worker threads, writing each at its own offset as it
finishes, and commit atomically. The tenant is paused only for the copies.
Must not import wasmtime or cuda; reaches the engine and accelerator through their protocols.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import zstandard

from tensorwasm.runtime import metrics
from tensorwasm.runtime.accel.base import Accelerator, TenantDevice
from tensorwasm.runtime.snapshots import codec
from tensorwasm.runtime.snapshots.pipeline import (
    STAGING,
    SnapshotPool,
    Stopwatch,
    layout,
    parallel_copy,
    workers,
)
from tensorwasm.runtime.snapshots.store import PendingBlob, SnapshotStore


@dataclass(frozen=True)
class CaptureResult:
    """A committed snapshot and what it cost."""

    path: Path
    digest: str
    manifest: codec.Manifest
    size_bytes: int
    timings: dict[str, float]


_local = threading.local()


def _cctx() -> zstandard.ZstdCompressor:
    cctx: zstandard.ZstdCompressor | None = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=codec.ZSTD_LEVEL, write_content_size=True)
    return cctx


class _ChunkWriter:
    """Compresses chunks on worker threads and appends them in completion order (offsets under a lock)."""

    def __init__(self, pending: PendingBlob) -> None:
        self.pending = pending
        self.cursor = codec.HEADER_SIZE
        self.lock = threading.Lock()

    def write(self, data: memoryview) -> codec.Chunk:
        kind, stored = codec.encode_chunk(data, _cctx())
        digest = codec.checksum(stored)
        with self.lock:
            offset = self.cursor
            self.cursor += len(stored)
        self.pending.pwrite(stored, offset)
        return codec.Chunk(offset, len(stored), len(data), kind, digest)


def capture_snapshot(
    store: SnapshotStore,
    *,
    tenant_uid: str,
    module_sha256: str,
    generation: int,
    pool: SnapshotPool,
    device: TenantDevice | None = None,
    accelerator: Accelerator | None = None,
    tenant: str = "",
    chunk_size: int | None = None,
) -> CaptureResult:
    """Capture, encode and durably store one snapshot; returns where it is and its digest."""
    watch = Stopwatch()
    with STAGING.turn(accelerator) as staging:
        with pool.quiesce():
            state = pool.capture_state()
            sizes = dict(sorted(device.buffers().items())) if device is not None else {}
            memory = state.memory
            # bytes are already a private copy; a view of live memory must be copied before release.
            copy_memory = not isinstance(memory, bytes)
            offsets = layout([*sizes.values(), len(memory) if copy_memory else 0])
            stage = staging.view(offsets[-1])
            if device is not None:
                device.sync()
                for (handle, size), off in zip(sizes.items(), offsets, strict=False):
                    if size:
                        device.read_into(handle, 0, stage[off : off + size])
            if copy_memory:
                parallel_copy(stage[offsets[-2] : offsets[-2] + len(memory)], memory)
                memory = stage[offsets[-2] : offsets[-2] + len(memory)]
            globals_ = list(state.globals)
            watch.lap("barrier")
        # The tenant runs again from here; encoding reads only the staged copies.
        gpu = {h: stage[off : off + n] for (h, n), off in zip(sizes.items(), offsets, strict=False)}
        result = write_snapshot(
            store,
            watch, tenant_uid=tenant_uid, module_sha256=module_sha256, generation=generation,
            memory=memory, globals_=globals_, gpu=gpu, tenant=tenant, chunk_size=chunk_size,
        )  # fmt: skip
    return result


def write_snapshot(
    store: SnapshotStore,
    watch: Stopwatch | None = None,
    *,
    tenant_uid: str,
    module_sha256: str,
    generation: int,
    memory: bytes | memoryview,
    globals_: list[codec.GlobalValue],
    gpu: Mapping[int, bytes | bytearray | memoryview],
    tenant: str = "",
    chunk_size: int | None = None,
) -> CaptureResult:
    """Encode host copies of a tenant's state on the worker threads and commit them atomically."""
    watch = watch or Stopwatch()
    regions = codec.plan_regions(memory, globals_, gpu)
    chunk_size = chunk_size or codec.choose_chunk_size(sum(len(r.data) for r in regions))
    with store.begin(tenant_uid) as pending:
        writer = _ChunkWriter(pending)
        jobs = [
            (region, region.data[start : start + n])
            for region in regions
            for start, n in codec.split(len(region.data), chunk_size)
        ]
        chunks = list(workers().map(lambda job: writer.write(job[1]), jobs))
        for (region, _), chunk in zip(jobs, chunks, strict=True):
            region.chunks.append(chunk)
        manifest = codec.build_manifest(
            tenant_uid=tenant_uid, module_sha256=module_sha256, generation=generation, regions=regions,
            chunk_size=chunk_size, tenant=tenant,
        )  # fmt: skip
        header, body, digest = codec.seal(manifest, writer.cursor)
        pending.pwrite(body, writer.cursor)
        pending.pwrite(header, 0)
        os.ftruncate(pending.fd, writer.cursor + len(body))
        watch.lap("encode")
        path = pending.commit(digest)
        watch.lap("commit")
    timings = watch.total()
    for phase, seconds in timings.items():
        metrics.SNAPSHOT_CAPTURE_PHASE_SECONDS.labels(phase).observe(seconds)
    size = writer.cursor + len(body)
    metrics.SNAPSHOT_BYTES.labels("capture", "raw").inc(manifest.raw_bytes)
    metrics.SNAPSHOT_BYTES.labels("capture", "stored").inc(size)
    return CaptureResult(path, digest, manifest, size, timings)
