"""Restore a tenant from a snapshot blob: verify everything first, then a pipelined load.

Owns the restore pipeline and its refusal rules. Phases (each a histogram sample):
  read        pread header + manifest, check the root checksum and structure
  verify      bind to tenant uid + module digest, check caps; then on the worker threads pread every
              chunk (raw chunks straight to their final place in pinned staging, compressed ones into
              a read-ahead area) and check its CRC-32; pread copies from the page cache with the GIL
              released and no page faults, where an mmap costs one fault per page on first touch
  decompress  restore_buffers, async H2D of every raw GPU chunk at once, zstd chunks decoded in
              parallel into staging and each uploaded as soon as it is decoded (overlapped)
  upload      the tail until the tenant's stream is synced
  instantiate wasm memory + globals written into the pool's instances
Nothing of the tenant changes until `read` and `verify` pass: a refused blob leaves state untouched.
Must not import wasmtime or cuda; reaches the engine and accelerator through their protocols.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorwasm.runtime import metrics
from tensorwasm.runtime.accel.base import Accelerator, TenantDevice
from tensorwasm.runtime.errors import GpuMemoryExhausted, SnapshotRejected
from tensorwasm.runtime.snapshots import codec
from tensorwasm.runtime.snapshots.pipeline import PACKED, STAGING, SnapshotPool, Stopwatch, layout, workers
from tensorwasm.runtime.snapshots.store import SnapshotStore

log = logging.getLogger(__name__)

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
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotRejected(f"snapshot {path} cannot be read: {exc.strerror or exc}") from exc
    try:
        parsed = codec.parse_parts(lambda offset, n: os.pread(fd, n, offset), os.fstat(fd).st_size)
        m = parsed.manifest
        watch.lap("read")
        check_binding(m, tenant_uid=tenant_uid, module_sha256=module_sha256, device=device,
                      memory_limit=memory_limit)  # fmt: skip
        plan = _Plan(m)
        with STAGING.turn(accelerator) as staging, PACKED.turn(None) as packed:
            stage = staging.view(plan.stage_bytes)
            ahead = packed.view(plan.packed_bytes)
            plan.fetch_all(fd, stage, ahead)
            globals_ = codec.decode_globals(plan.region_view(stage, m.region("globals")))
            watch.lap("verify")
            with pool.quiesce():
                check_pool(pool, m.region("wasm_memory").size, globals_)
                plan.load(stage, ahead, device, watch)
                memory = plan.region_view(stage, m.region("wasm_memory"))
                pool.restore_state((make_state or _wasm_state)(memory, globals_))
                watch.lap("instantiate")
    except SnapshotRejected:
        metrics.SNAPSHOT_REJECTED.inc()
        raise
    finally:
        os.close(fd)
    timings = watch.total()
    for phase, seconds in timings.items():
        metrics.SNAPSHOT_RESTORE_PHASE_SECONDS.labels(phase).observe(seconds)
    metrics.SNAPSHOT_BYTES.labels("restore", "raw").inc(m.raw_bytes)
    metrics.SNAPSHOT_BYTES.labels("restore", "stored").inc(parsed.file_length)
    return RestoreResult(parsed.digest, m, timings)


# Below this many stored bytes, thread hand-offs cost more than they save (CRC-32 runs ~2.5 GB/s).
_SERIAL_BYTES = 256 << 10


class _Plan:
    """Where every chunk lands: decoded regions in staging (page-aligned), zstd chunks in read-ahead."""

    def __init__(self, m: codec.Manifest) -> None:
        self.m = m
        self.regions = [*codec.iter_gpu_regions(m), m.region("wasm_memory"), m.region("globals")]
        offsets = layout([r.size for r in self.regions])
        self.stage_bytes = offsets[-1]
        self.base = {r: off for r, off in zip(self.regions, offsets, strict=False)}
        # chunk index -> (region, start within region, offset in staging, offset in read-ahead or -1)
        self.chunks: list[tuple[codec.Region, int, int, int]] = [None] * len(m.chunks)  # type: ignore[list-item]
        packed = 0
        for r in self.regions:
            for j in range(r.chunk_count):
                i, start = r.first_chunk + j, j * m.chunk_size
                c = m.chunks[i]
                ahead = -1
                if c.codec == "zstd":
                    ahead, packed = packed, packed + c.stored
                self.chunks[i] = (r, start, self.base[r] + start, ahead)
        self.packed_bytes = packed
        self.serial = m.stored_bytes <= _SERIAL_BYTES

    def region_view(self, stage: memoryview, r: codec.Region) -> memoryview:
        return stage[self.base[r] : self.base[r] + r.size]

    def _map(self, fn: Callable[[int], None], indices: list[int]) -> list[cf.Future[None]] | None:
        if self.serial:
            for i in indices:
                fn(i)
            return None
        return [workers().submit(fn, i) for i in indices]

    def fetch_all(self, fd: int, stage: memoryview, ahead: memoryview) -> None:
        """pread + checksum every chunk; raises SnapshotRejected before anything of the tenant changes."""

        def fetch(i: int) -> None:
            c = self.m.chunks[i]
            _, _, at, slot = self.chunks[i]
            dst = stage[at : at + c.size] if slot < 0 else ahead[slot : slot + c.stored]
            _pread_into(fd, dst, c.offset)
            codec.check_stored(dst, self.m, i)

        futures = self._map(fetch, list(range(len(self.m.chunks))))
        for f in futures or ():
            f.result()

    def load(
        self, stage: memoryview, ahead: memoryview, device: TenantDevice | None, watch: Stopwatch
    ) -> None:
        """GPU buffers recreated, raw chunks uploaded at once, zstd chunks decoded then uploaded."""
        m = self.m
        if device is not None:
            try:
                device.restore_buffers(m.gpu_buffers())  # all-or-nothing: the first state change
            except GpuMemoryExhausted as exc:
                raise SnapshotRejected(
                    f"snapshot GPU buffers do not fit the tenant's cap: {exc.message}", reason="OverCap"
                ) from exc
        packed = [i for i, (_, _, _, slot) in enumerate(self.chunks) if slot >= 0]
        if device is not None:
            for i, (r, start, at, slot) in enumerate(self.chunks):
                if slot < 0 and r.handle is not None:
                    device.write_async(r.handle, start, stage[at : at + m.chunks[i].size])

        def decode(i: int) -> None:
            c = m.chunks[i]
            _, _, at, slot = self.chunks[i]
            codec.decode_stored_into(ahead[slot : slot + c.stored], c, stage[at : at + c.size])

        futures = self._map(decode, packed)
        if futures is None:
            done: list[int] = packed
        else:
            index = {f: i for f, i in zip(futures, packed, strict=True)}
            done = []
            for f in cf.as_completed(futures):
                f.result()
                done.append(index[f])
                self._upload(device, stage, index[f])  # H2D overlaps the chunks still decoding
        if futures is None:
            for i in done:
                self._upload(device, stage, i)
        watch.lap("decompress")
        if device is not None:
            device.sync()
        watch.lap("upload")

    def _upload(self, device: TenantDevice | None, stage: memoryview, i: int) -> None:
        r, start, at, _ = self.chunks[i]
        if device is not None and r.handle is not None:
            device.write_async(r.handle, start, stage[at : at + self.m.chunks[i].size])


def _pread_into(fd: int, dst: memoryview, offset: int) -> None:
    got = 0
    while got < len(dst):
        n = os.preadv(fd, [dst[got:]], offset + got)
        if n <= 0:
            raise SnapshotRejected("snapshot file shrank while it was being read")
        got += n


def _wasm_state(memory: memoryview, globals_: list[codec.GlobalValue]) -> Any:
    # Imported here: the engine module pulls in wasmtime, which snapshots must not import at module level.
    from tensorwasm.runtime.engine import WasmState

    return WasmState(memory=memory, globals=globals_)


def restore_latest(
    store: SnapshotStore,
    *,
    tenant_uid: str,
    module_sha256: str,
    pool: SnapshotPool,
    device: TenantDevice | None = None,
    accelerator: Accelerator | None = None,
) -> RestoreResult | None:
    """Restore the newest blob of `tenant_uid` that verifies and binds; None when there is none.

    A blob refused for this tenant (another module digest after an upgrade, over a lowered cap, damaged)
    is skipped for the next older one: a tenant starts fresh rather than not at all.
    """
    for stored in store.list(tenant_uid):
        try:
            return restore_snapshot(
                stored.path, tenant_uid=tenant_uid, module_sha256=module_sha256, pool=pool, device=device,
                accelerator=accelerator,
            )  # fmt: skip
        except SnapshotRejected as exc:
            log.warning(
                "Skipped snapshot tenant_uid=%s digest=%s message=%s", tenant_uid, stored.digest, exc.message
            )
    return None
