"""Capture a tenant's live state into the store at one barrier.

Owns the capture pipeline: quiesce the instance pool (no invoke in flight), clone every GPU buffer
device to device (`TenantDevice.clone_buffers`, at HBM speed) and copy wasm memory and globals, release
the barrier; then read the clone back to host staging, compress + checksum chunks on the worker
threads, writing each at its own offset as it finishes, and commit atomically. The tenant is paused
only for the device-side clone and the wasm memory copy; without room for a clone it is paused for
the device-to-host copies instead. Staging is a hot-tier slot when the tier has room, laid out as a
restore lays it out: the committed snapshot then enters the tier with one seal per chunk, computed
while the chunk is being compressed. With a signing key (snapshots/signing.py: the policy's active
key) each chunk's SHA-256 is computed beside its CRC on the same thread and the header is signed.
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
from tensorwasm.runtime.snapshots import codec, signing
from tensorwasm.runtime.snapshots.hot_tier import HOT_TIERS, HotTier, Slot, chunk_seal
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
    hot: bool = False  # the snapshot entered the hot tier


_local = threading.local()


def _cctx() -> zstandard.ZstdCompressor:
    cctx: zstandard.ZstdCompressor | None = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=codec.ZSTD_LEVEL, write_content_size=True)
    return cctx


class _ChunkWriter:
    """Compresses chunks on worker threads and appends them in completion order (offsets under a lock)."""

    def __init__(self, pending: PendingBlob, seal: bool, signed: bool) -> None:
        self.pending = pending
        self.cursor = codec.HEADER_SIZE
        self.lock = threading.Lock()
        self.seal = seal
        self.signed = signed

    def write(self, data: memoryview) -> tuple[codec.Chunk, int]:
        kind, stored = codec.encode_chunk(data, _cctx())
        with self.lock:
            offset = self.cursor
            self.cursor += len(stored)
        chunk = codec.stored_chunk(offset, data, kind, stored, signed=self.signed)
        self.pending.pwrite(stored, offset)
        return chunk, chunk_seal(data) if self.seal else 0


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
    hot: HotTier | None = None,
    signing_policy: signing.SigningPolicy | None = None,
) -> CaptureResult:
    """Capture, encode and durably store one snapshot; returns where it is and its digest.

    `hot` defaults to the accelerator's tier (`HOT_TIERS`); the snapshot enters it when it fits.
    `signing_policy` defaults to the process's (`signing.POLICY`); its key is chosen before the barrier."""
    tier = hot if hot is not None else HOT_TIERS.for_accelerator(accelerator)
    signer = (signing_policy or signing.current()).signer()
    watch = Stopwatch()
    slot: Slot | None = None
    try:
        with STAGING.turn(accelerator) as staging:
            with pool.quiesce():
                state = pool.capture_state()
                sizes = dict(sorted(device.buffers().items())) if device is not None else {}
                memory = state.memory
                globals_ = list(state.globals)
                globals_bytes = codec.encode_globals(globals_)
                # The restore layout: GPU buffers by handle, wasm memory, globals; each page-aligned.
                offsets = layout([*sizes.values(), len(memory), len(globals_bytes)])
                slot = tier.reserve(offsets[-1]) if tier is not None else None
                stage = slot.view if slot is not None else staging.view(offsets[-1])
                clone = device.clone_buffers() if device is not None and sizes else None
                if device is not None and sizes and clone is None:
                    device.sync()  # no room for a device-side clone: copy to host inside the barrier
                    for (handle, size), off in zip(sizes.items(), offsets, strict=False):
                        device.read_into(handle, 0, stage[off : off + size])
                mem_at = offsets[len(sizes)]
                if not isinstance(memory, bytes):  # a view of live memory: copy before release
                    parallel_copy(stage[mem_at : mem_at + len(memory)], memory)
                watch.lap("barrier")
            # The tenant runs again from here; encoding reads only the staged copies.
            if clone is not None:
                try:
                    for (handle, size), off in zip(sizes.items(), offsets, strict=False):
                        clone.read_into(handle, stage[off : off + size])
                finally:
                    clone.close()
            if isinstance(memory, bytes):
                parallel_copy(stage[mem_at : mem_at + len(memory)], memory)
            glob_at = offsets[len(sizes) + 1]
            stage[glob_at : glob_at + len(globals_bytes)] = globals_bytes
            watch.lap("stage")
            gpu = {h: stage[off : off + n] for (h, n), off in zip(sizes.items(), offsets, strict=False)}
            seals: list[int] = []
            result = write_snapshot(
                store,
                watch, tenant_uid=tenant_uid, module_sha256=module_sha256, generation=generation,
                memory=stage[mem_at : mem_at + len(memory)], globals_=globals_, gpu=gpu, tenant=tenant,
                chunk_size=chunk_size, seals_out=seals if slot is not None else None, signer=signer,
            )  # fmt: skip
        if slot is not None and tier is not None:
            tier.insert(slot, result.digest, result.manifest, seals)
            slot = None
            result = CaptureResult(result.path, result.digest, result.manifest, result.size_bytes,
                                   result.timings, hot=True)  # fmt: skip
    finally:
        if slot is not None and tier is not None:
            tier.release(slot)
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
    seals_out: list[int] | None = None,
    signer: codec.Signer | None = None,
) -> CaptureResult:
    """Encode host copies of a tenant's state on the worker threads and commit them atomically.

    `seals_out` receives the hot-tier seal of every chunk's raw bytes, in chunk order; `signer`
    (key id, key) signs the blob."""
    watch = watch or Stopwatch()
    regions = codec.plan_regions(memory, globals_, gpu)
    chunk_size = chunk_size or codec.choose_chunk_size(sum(len(r.data) for r in regions))
    with store.begin(tenant_uid) as pending:
        writer = _ChunkWriter(pending, seals_out is not None, signer is not None)
        jobs = [
            (region, region.data[start : start + n])
            for region in regions
            for start, n in codec.split(len(region.data), chunk_size)
        ]
        written = list(workers().map(lambda job: writer.write(job[1]), jobs))
        for (region, _), (chunk, _) in zip(jobs, written, strict=True):
            region.chunks.append(chunk)
        manifest = codec.build_manifest(
            tenant_uid=tenant_uid, module_sha256=module_sha256, generation=generation, regions=regions,
            chunk_size=chunk_size, tenant=tenant,
        )  # fmt: skip
        header, body, digest = codec.seal(manifest, writer.cursor, signer)
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
    if seals_out is not None:
        seals_out[:] = [s for _, s in written]
    return CaptureResult(path, digest, manifest, size, timings)
