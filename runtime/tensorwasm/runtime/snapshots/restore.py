"""Restore a tenant from a snapshot: from the pinned hot tier when it holds the blob, else from the file.

Owns the restore pipeline and its refusal rules. Phases (each a histogram sample):
  read        file: pread header + manifest, check the root checksum and structure; hot tier: lookup
  verify      bind to tenant uid + module digest, check caps; then, one task per chunk on the worker
              threads: file: pread (raw chunks straight to their place in pinned staging, zstd ones
              into a read-ahead area), check the CRC-32, decode, seal for the hot tier; hot tier:
              check the entry's seal. A chunk that passed is uploaded at once into unpublished GPU
              buffers (`TenantDevice.stage_restore`) when the cap has room for them beside the live
              ones, so checking overlaps the copies; otherwise uploads wait until every chunk passed.
              A hot restore with unpublished buffers copies each GPU buffer whole and checks its
              chunks' seals on the device (`TenantDevice.word_sums`): the host reads nothing twice
  upload      the tail until the tenant's stream is synced (everything, when uploads had to wait)
  instantiate under the pool's barrier: the unpublished buffers become the tenant's (or the buffers
              are recreated and filled), wasm memory + globals written into the pool's instances
The signature (snapshots/signing.py: require / verify-if-present / off) is judged right after the
header and manifest are read, before the binding; a signed blob's chunks are checked by SHA-256.
A file named by a digest must carry that digest (a renamed older blob is not restored in its place).
Hot-tier entries were captured or verified by this process, so they are not judged again.
Nothing the tenant can see changes until every chunk passed: a refused blob leaves state untouched
(unpublished buffers are freed; the cap counted them meanwhile). A hot entry that fails its seal is
dropped from the tier and the restore falls back to the file, which is checked on its own.
Must not import wasmtime or cuda; reaches the engine and accelerator through their protocols.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorwasm.api.tenant import WASM_PAGE
from tensorwasm.runtime import metrics
from tensorwasm.runtime.accel.base import Accelerator, TenantDevice
from tensorwasm.runtime.errors import GpuMemoryExhausted, SnapshotRejected
from tensorwasm.runtime.snapshots import codec, signing
from tensorwasm.runtime.snapshots.hot_tier import (
    HOT_TIERS,
    HotEntry,
    HotTier,
    Slot,
    chunk_seal,
    digest_of,
    seal_of,
)
from tensorwasm.runtime.snapshots.pipeline import PACKED, STAGING, SnapshotPool, Stopwatch, layout, workers
from tensorwasm.runtime.snapshots.store import SnapshotStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreResult:
    """What was restored and what each phase cost (seconds)."""

    digest: str
    manifest: codec.Manifest
    timings: dict[str, float]
    source: str = "file"  # "hot": served from the pinned hot tier
    signature: str = ""  # the signature verdict of a file restore ("signed with key 'k1', verified")


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


class _EntryCorrupt(SnapshotRejected):
    """A hot-tier entry failed its seal (the file is still checked on its own)."""


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
    hot: HotTier | None = None,
    signing_policy: signing.SigningPolicy | None = None,
) -> RestoreResult:
    """Verify the snapshot completely, then load it into `pool` and `device`; SnapshotRejected if refused.

    `hot` defaults to the accelerator's tier (`HOT_TIERS`, sized by the shard's settings);
    `signing_policy` to the process's (`signing.POLICY`)."""
    tier = hot if hot is not None else HOT_TIERS.for_accelerator(accelerator)
    digest = digest_of(path) if tier is not None else None
    target = _Target(tenant_uid, module_sha256, pool, device, memory_limit, make_state,
                     signing_policy or signing.current())  # fmt: skip
    try:
        if tier is not None and digest is not None:
            with tier.lease(digest) as entry:
                if entry is not None:
                    try:
                        result = _restore_hot(entry, target)
                    except _EntryCorrupt as exc:
                        tier.drop(digest)
                        metrics.SNAPSHOT_HOT_TIER_LOOKUPS.labels("corrupt").inc()
                        log.error(
                            "Dropped corrupt hot-tier snapshot digest=%s message=%s", digest, exc.message
                        )
                    else:
                        metrics.SNAPSHOT_HOT_TIER_LOOKUPS.labels("hit").inc()
                        return _observed(result)
                else:
                    metrics.SNAPSHOT_HOT_TIER_LOOKUPS.labels("miss").inc()
        return _observed(_restore_file(path, target, accelerator, tier))
    except SnapshotRejected:
        metrics.SNAPSHOT_REJECTED.inc()
        raise


@dataclass(frozen=True)
class _Target:
    """Whom a restore is for, and how its wasm state is built."""

    tenant_uid: str
    module_sha256: str
    pool: SnapshotPool
    device: TenantDevice | None
    memory_limit: int | None
    make_state: Callable[[memoryview, list[codec.GlobalValue]], Any] | None
    signing_policy: signing.SigningPolicy

    def bind(self, m: codec.Manifest) -> None:
        check_binding(m, tenant_uid=self.tenant_uid, module_sha256=self.module_sha256, device=self.device,
                      memory_limit=self.memory_limit)  # fmt: skip


def _observed(result: RestoreResult) -> RestoreResult:
    for phase, seconds in result.timings.items():
        metrics.SNAPSHOT_RESTORE_PHASE_SECONDS.labels(phase).observe(seconds)
    metrics.SNAPSHOT_BYTES.labels("restore", "raw").inc(result.manifest.raw_bytes)
    return result


def _restore_hot(entry: HotEntry, target: _Target) -> RestoreResult:
    """With room for unpublished buffers: one copy per GPU buffer, seals checked on the device, wasm
    memory and globals on the host, then published. Without: every seal on the host, then uploaded."""
    watch = Stopwatch()
    m = entry.manifest
    if entry.plan is None:
        entry.plan = _Plan(m)
    plan: _Plan = entry.plan
    watch.lap("read")
    target.bind(m)
    stage = entry.slot.view

    def damaged(i: int) -> _EntryCorrupt:
        return _EntryCorrupt(f"hot-tier copy of chunk {i} ({codec._region_of(m, i)}) is damaged")

    def check(i: int) -> None:
        _, _, at, _ = plan.chunks[i]
        if chunk_seal(stage[at : at + m.chunks[i].size]) != entry.seals[i]:
            raise damaged(i)

    def check_on_device(device: TenantDevice, staged: dict[int, int]) -> None:
        regions = plan.gpu_regions
        sums = device.word_sums([staged[r.handle] for r in regions if r.handle is not None], m.chunk_size)
        for r, region_sums in zip(regions, sums, strict=True):
            for j, words in enumerate(region_sums):
                i = r.first_chunk + j
                if seal_of(words, m.chunks[i].size) != entry.seals[i]:
                    raise damaged(i)

    # GPU chunks are checked on the device after one copy per buffer (HBM speed, the host only copies);
    # the rest (wasm memory, globals) on the host.
    device_ok = m.chunk_size % 8 == 0 and all(r.chunk_count <= 65535 for r in plan.gpu_regions)
    host_bytes = m.raw_bytes - sum(r.size for r in plan.gpu_regions) if device_ok else m.raw_bytes
    _load(
        plan, stage, target, watch, check, serial=host_bytes <= _SERIAL_RAW_BYTES,
        device_check=check_on_device if device_ok else None,
    )  # fmt: skip
    return RestoreResult(entry.digest, m, watch.total(), source="hot")


def _restore_file(
    path: Path, target: _Target, accelerator: Accelerator | None, tier: HotTier | None
) -> RestoreResult:
    watch = Stopwatch()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotRejected(f"snapshot {path} cannot be read: {exc.strerror or exc}") from None
    slot: Slot | None = None
    try:
        parsed = codec.parse_parts(lambda offset, n: os.pread(fd, n, offset), os.fstat(fd).st_size)
        m = parsed.manifest
        named = digest_of(path)
        if named is not None and named != parsed.digest:
            raise SnapshotRejected(
                f"snapshot file {path.name} holds the blob with digest {parsed.digest}, not {named}"
            )
        verdict = target.signing_policy.check(parsed)
        watch.lap("read")
        target.bind(m)
        plan = _Plan(m)
        # Decode straight into a hot-tier slot when one is free: the next restore is then a copy.
        slot = tier.reserve(plan.stage_bytes) if tier is not None else None
        seals: list[int] | None = [0] * len(m.chunks) if slot is not None else None
        with contextlib.ExitStack() as turns:
            if slot is not None:
                stage = slot.view
            else:
                stage = turns.enter_context(STAGING.turn(accelerator)).view(plan.stage_bytes)
            ahead = (
                turns.enter_context(PACKED.turn(None)).view(plan.packed_bytes) if plan.packed_bytes else None
            )

            def fetch(i: int) -> None:
                c = m.chunks[i]
                _, _, at, packed_at = plan.chunks[i]
                out = stage[at : at + c.size]
                if packed_at < 0:
                    _pread_into(fd, out, c.offset)
                    codec.check_stored(out, m, i)
                else:
                    assert ahead is not None
                    packed = ahead[packed_at : packed_at + c.stored]
                    _pread_into(fd, packed, c.offset)
                    codec.check_stored(packed, m, i)
                    codec.decode_stored_into(packed, c, out)
                if seals is not None:
                    seals[i] = chunk_seal(out)

            _load(plan, stage, target, watch, fetch, serial=m.stored_bytes <= _SERIAL_BYTES)
        if slot is not None and seals is not None and tier is not None:
            tier.insert(slot, parsed.digest, m, seals)
            slot = None
    finally:
        os.close(fd)
        if slot is not None and tier is not None:
            tier.release(slot)
    metrics.SNAPSHOT_BYTES.labels("restore", "stored").inc(parsed.file_length)
    return RestoreResult(parsed.digest, m, watch.total(), signature=verdict)


def _load(
    plan: _Plan,
    stage: memoryview,
    target: _Target,
    watch: Stopwatch,
    prepare: Callable[[int], None],
    *,
    serial: bool,
    device_check: Callable[[TenantDevice, dict[int, int]], None] | None = None,
) -> None:
    """Run `prepare(i)` for every chunk (it fills and checks chunk i in `stage`), upload, publish.

    With `device_check` and room for unpublished buffers, GPU chunks skip `prepare`: each GPU region
    is uploaded in one copy and `device_check` checks them on the device before anything is published."""
    m, device = plan.m, target.device
    gpu_sizes = m.gpu_buffers()
    staged: dict[int, int] | None = None
    if device is not None:
        try:
            staged = device.stage_restore(gpu_sizes)
        except GpuMemoryExhausted:
            staged = None  # no room beside the live buffers: upload only after every chunk passed
    published = False
    on_device = device is not None and staged is not None and device_check is not None
    try:
        if on_device:
            assert device is not None and staged is not None
            for r in plan.gpu_regions:
                if r.handle is not None:
                    device.write_async(staged[r.handle], 0, plan.region_view(stage, r))

        def one(i: int) -> None:
            prepare(i)
            if staged is not None:
                plan.upload(device, stage, i, staged)

        on_host = [i for i, c in enumerate(plan.chunks) if not (on_device and c[0].handle is not None)]
        _run_all(one, on_host, serial)
        if on_device:
            assert device is not None and staged is not None and device_check is not None
            device_check(device, staged)
        globals_ = codec.decode_globals(plan.region_view(stage, m.region("globals")))
        watch.lap("verify")
        if device is not None and staged is not None:
            device.sync()  # the copies still in flight behind the last checks
        watch.lap("upload")
        with target.pool.quiesce():
            check_pool(target.pool, m.region("wasm_memory").size, globals_)
            if device is not None and staged is not None:
                device.publish_restore(staged)
                published = True
            elif device is not None:
                try:
                    # all-or-nothing, the first state change; refused when it does not fit the cap
                    device.restore_buffers(gpu_sizes)
                except GpuMemoryExhausted as exc:
                    raise SnapshotRejected(
                        f"snapshot GPU buffers do not fit the tenant's cap: {exc.message}", reason="OverCap"
                    ) from exc
                for i in range(len(m.chunks)):
                    plan.upload(device, stage, i, None)
                device.sync()
                watch.lap("upload")
            memory = plan.region_view(stage, m.region("wasm_memory"))
            target.pool.restore_state((target.make_state or _wasm_state)(memory, globals_))
            watch.lap("instantiate")
    except BaseException:
        if device is not None and staged is not None and not published:
            _discard(device, staged)
        raise


def _discard(device: TenantDevice, staged: dict[int, int]) -> None:
    """Free unpublished buffers once no copy into them is in flight (their source may be a hot slot)."""
    with contextlib.suppress(Exception):
        device.sync()
    for temp in staged.values():
        with contextlib.suppress(Exception):
            device.free(temp)


def _run_all(fn: Callable[[int], None], indices: Sequence[int], serial: bool) -> None:
    """fn(i) for every index; on the worker threads unless `serial`. Every task has ended on return,
    also when one raised (the first error is re-raised), so nothing runs on behind the caller."""
    if serial:
        for i in indices:
            fn(i)
        return
    futures = [workers().submit(fn, i) for i in indices]
    cf.wait(futures)
    for f in futures:
        f.result()


# Below this many stored bytes, thread hand-offs cost more than they save (CRC-32 runs ~2.5 GB/s).
_SERIAL_BYTES = 256 << 10
# Seals run at memory bandwidth: below this many raw bytes the hot path checks on one thread.
_SERIAL_RAW_BYTES = 2 << 20


class _Plan:
    """Where every chunk lands: decoded regions in staging (page-aligned), zstd chunks in read-ahead."""

    def __init__(self, m: codec.Manifest) -> None:
        self.m = m
        self.gpu_regions = list(codec.iter_gpu_regions(m))
        self.regions = [*self.gpu_regions, m.region("wasm_memory"), m.region("globals")]
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

    def region_view(self, stage: memoryview, r: codec.Region) -> memoryview:
        return stage[self.base[r] : self.base[r] + r.size]

    def upload(
        self, device: TenantDevice | None, stage: memoryview, i: int, staged: dict[int, int] | None
    ) -> None:
        """Queue chunk i's host-to-device copy (GPU regions only), into `staged` temporaries if given."""
        r, start, at, _ = self.chunks[i]
        if device is not None and r.handle is not None:
            handle = staged[r.handle] if staged is not None else r.handle
            device.write_async(handle, start, stage[at : at + self.m.chunks[i].size])


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
