"""Idle tenants sleep in a snapshot and wake on their first request, below the HTTP layer.

Owns `Sleeper` (one per served tenant of a shard with a snapshot store: the gate each of its
invokes passes on the tenant's own worker thread), `SleepRecords` (the durable note "this tenant
sleeps in blob D", so a restarted shard keeps its sleepers asleep) and `SleepParts` (what every
sleeper of one shard shares).
- Sleep (idle past spec.idle.after, or evicted to make GPU room): under the gate's lock, with no
  invoke running and none queued, capture at the pool's barrier (snapshots/capture.py: the blob is
  durable and, when it fits, in the pinned hot tier), write the record, close the instances and
  the device (the tenant's CUDA pool and GPU memory), give the GPU reservation back.
- Wake (the first invoke finding it asleep): under the same lock, so concurrent invokes of the
  tenant wait behind it (their number bounded by the tenant's queue: past it, 429 + Retry-After,
  as for any busy tenant); reserve GPU room (tenancy/idle.py may put LRU idle neighbours to sleep),
  open the device and the instances, restore the blob (hot tier when there, else the file; every
  check of a normal restore applies), remove the record. A refused restore fails the waking
  request and every request that waited for that wake with a clear `tenant_not_ready`
  (reason WakeFailed), drops the blob, and restarts the tenant from its module (fresh state), so
  the next request is served. A restore that fails on I/O (EIO, ESTALE reading the blob) closes the
  device and gives its reservation back at once, keeps the blob and record, and fails the waiting
  requests with a retryable `tenant_not_ready` (WakeFailed, Retry-After): the next request tries again.
- A capture that fails (disk full, store error) leaves the tenant awake and refuses further sleeps of
  it for SLEEP_RETRY_S (doubling to SLEEP_RETRY_MAX_S while it keeps failing): neither the idle scan
  nor an eviction copies its whole state again and again (tensorwasm_tenant_sleep_failures_total).
- A closed sleeper (the shard unloaded the tenant) never wakes again: a request or a Snapshot that
  found it just before the unload gets `tenant_not_ready` instead of opening a device nobody closes.
- The record is signed when the shard signs snapshots (HMAC-SHA256 with the active key of the same
  ring, over the sleep key and every field, the blob's digest included), and a wake from a record
  read from disk checks it first (`check_record`): a record edited to name another blob (an older
  sleep blob of the same tenant, kept as a copy) is refused, as is an unsigned record naming a
  signed blob (a stripped signature) or an unsigned blob under `require`; except a record written
  before records were signed (the upgrade) whose signed blob verifies and is the newest blob of its
  key: adopted, and signed at its wake. A refused record fails
  the waking requests (`tenant_not_ready`, WakeFailed, `sleep_record` naming why) and the tenant
  restarts from its module; the record and the blobs stay on the volume (nothing is deleted on a
  verdict an attacker can provoke), until the tenant sleeps again or is deleted. Without keys
  (signing off, or no active key) records are written unsigned, as before, and accepted.
- Sweep (`sweep_orphans`, the shard's periodic pass): the records and blobs of sleep keys no Tenant
  owns any more (deleted while asleep and unserved, or while its shard was down) are removed,
  record first, bounded per pass; the sleep snapshots left are counted by signing key, and those
  signed with a key the ring no longer lists are named (their wake would lose their state).
Must not import wasmtime, cuda or aiohttp (the shard hands in how to open and close a tenant).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any

from tensorwasm.api.tenant import PREWARM_HISTORY
from tensorwasm.runtime import metrics
from tensorwasm.runtime.errors import BadRequest, QueueFull, RuntimeFault, TenantNotReady
from tensorwasm.runtime.snapshots import codec, signing
from tensorwasm.runtime.snapshots.capture import capture_snapshot
from tensorwasm.runtime.snapshots.hot_tier import HOT_TIERS, HotTier, digest_of
from tensorwasm.runtime.snapshots.restore import restore_snapshot
from tensorwasm.runtime.snapshots.store import SnapshotStore, fsync_dir, read_manifest
from tensorwasm.runtime.tenancy.idle import Residency
from tensorwasm.runtime.tenancy.prewarm import PREWARMED_SLOTS_KEPT, ArrivalHistory

if TYPE_CHECKING:
    from tensorwasm.runtime.accel.base import Accelerator, TenantDevice
    from tensorwasm.runtime.engine import CompiledModule, TenantInstancePool
    from tensorwasm.runtime.tenancy.config import TenantConfig

log = logging.getLogger(__name__)

WAKE_FAILED = "WakeFailed"
Opened = tuple["TenantInstancePool", "TenantDevice | None"]


KEY_SUFFIX = ".sleep"
# `<store root>/sleep-owners/<namespace>/<sleep key>`: an empty file filing a sleep key under the
# namespace of its Tenant (LOCAL_NAMESPACE for a tenants-file shard). A store may be shared by
# releases in several namespaces (one RWX export behind each release's claim): a shard's sweep only
# ever deletes keys filed under its own namespace, whose Tenants it can list.
CLAIMS_DIR = "sleep-owners"
LOCAL_NAMESPACE = "_local"  # not a DNS label: no namespace can be called that
# The orphan sweep (sweep_orphans): at most this many sleep keys removed per pass, so a pass stays
# short however many Tenants went away; the rest wait for the next pass (counted in `Swept.left`).
SWEEP_LIMIT = 64
# ... and none younger than this (its newest file's mtime): a tenant assigned after the sweep took
# its list of live keys may already be sleeping into a fresh key.
SWEEP_GRACE_S = 300.0
# A blob of a kept key that nothing names goes after this long (`_remove_strays`): longer than any
# move (the operator's move timeout is at most 3600 s), whose source may wake from its blob after a
# rollback although the target removed the record naming it.
SWEEP_STRAY_GRACE_S = 7200.0
# A failed sleep capture: no new attempt for this long, doubled per consecutive failure up to the max.
SLEEP_RETRY_S = 5.0
SLEEP_RETRY_MAX_S = 300.0
# A wake that failed on I/O (the blob is kept): the Retry-After of the requests it failed.
WAKE_RETRY_AFTER_S = 1.0
UNLOADED = "Unloaded"


def sleep_key(config: TenantConfig) -> str:
    """The store directory of a tenant's sleep blob: its uid (a re-created Tenant never wakes in
    its predecessor's state), apart from the Snapshot blobs so retention never removes it."""
    return sleep_key_of(config.uid or "local-" + config.name)


def sleep_key_of(uid: str) -> str:
    """The sleep key of a Tenant uid (or of `local-<name>` for a tenants-file tenant)."""
    return f"{uid}{KEY_SUFFIX}"


@dataclass(frozen=True)
class SleepRecord:
    digest: str
    module_sha256: str
    generation: int
    tenant: str
    slept_at: float
    key_id: str = ""  # signed records: the ring's key id, and the MAC (hex) over `record_message`
    mac: str = ""

    @property
    def fields(self) -> dict[str, Any]:
        """What the MAC covers (with the sleep key): everything but the signature."""
        return {"digest": self.digest, "module_sha256": self.module_sha256, "generation": self.generation,
                "tenant": self.tenant, "slept_at": self.slept_at}  # fmt: skip


_RECORD_DOMAIN = b"tensorwasm-sleep-record\n"  # a record's MAC can never pass for a blob's


def record_message(key: str, record: SleepRecord) -> bytes:
    return (
        _RECORD_DOMAIN
        + json.dumps({"key": key, **record.fields}, sort_keys=True, separators=(",", ":")).encode()
    )


class RecordRefused(Exception):
    """A sleep record failed `check_record`: the message says why, `reason` is a CamelCase word."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_record(
    key: str,
    record: SleepRecord,
    path: Path,
    policy: signing.SigningPolicy,
    store: SnapshotStore | None = None,
) -> bool:
    """Judge a record read from disk against the ring, as signing.SigningPolicy.check judges a blob
    (mode off: nothing is verified). A signed record must carry a MAC of a listed key over the sleep
    key and every field, so it names exactly the blob it was written for. An unsigned record naming
    an unsigned blob is accepted under `verify-if-present` and refused under `require`. An unsigned
    record naming a signed blob is refused (its signature was stripped, or it was pointed at an older
    blob) unless it is a legacy record (`_legacy_record`: written before records were signed, review
    R3 K1): then True is returned and the caller re-signs it. Raises RecordRefused."""
    if policy.mode == "off":
        return False
    if not record.mac:
        if store is None:
            if policy.mode == "require":
                raise RecordRefused("the sleep record is unsigned and this shard requires signed snapshots",
                                    signing.UNSIGNED)  # fmt: skip
            parsed = read_manifest(path)
            if parsed.signature is not None:
                raise RecordRefused(
                    "the sleep record is unsigned but names a snapshot signed with key "
                    f"{parsed.signature.key_id!r}: its signature was removed", signing.UNSIGNED,
                )  # fmt: skip
            return False
        parsed = read_manifest(path)
        if parsed.signature is None:
            if policy.mode == "require":
                raise RecordRefused("the sleep record is unsigned and names an unsigned snapshot, and this "
                                    "shard requires signed snapshots", signing.UNSIGNED)  # fmt: skip
            return False
        _legacy_record(key, record, parsed, policy, store)
        return True
    try:
        ring = policy.current_ring()
    except signing.KeyRingError as exc:
        raise RecordRefused(f"cannot verify the sleep record: {exc}", signing.UNKNOWN_KEY) from exc
    secret = ring.keys.get(record.key_id)
    if secret is None:
        listed = ", ".join(sorted(ring.keys)) or "none"
        raise RecordRefused(f"the sleep record is signed with key id {record.key_id!r}, which is not in "
                            f"this shard's key ring (keys: {listed})", signing.UNKNOWN_KEY)  # fmt: skip
    try:
        mac = bytes.fromhex(record.mac)
    except ValueError:
        mac = b""
    if not codec.mac_matches(codec.Signature(record.key_id, mac, record_message(key, record)), secret):
        raise RecordRefused(
            f"the sleep record's signature does not match key {record.key_id!r}: it was changed after "
            f"it was written (it names blob {record.digest})", signing.BAD_SIGNATURE,
        )  # fmt: skip
    return False


def _legacy_record(
    key: str, record: SleepRecord, parsed: codec.Parsed, policy: signing.SigningPolicy, store: SnapshotStore
) -> None:
    """An unsigned record naming a signed blob: accepted (under both key-ring modes) only when it can
    be a record of a build that did not sign records yet, i.e. when it could not roll the tenant back:
    the blob's signature verifies under this shard's ring, and the blob is strictly the newest
    (generation, created_at: signed manifest fields) of every blob stored under this sleep key, so
    pointing an unsigned record at an older blob (review N7) stays refused. Raises RecordRefused."""
    key_id = parsed.signature.key_id if parsed.signature is not None else ""
    try:
        policy.check(parsed)
    except RuntimeFault as exc:
        raise RecordRefused(
            f"the sleep record is unsigned and the snapshot it names does not verify: {exc.message}",
            str(exc.details.get("reason") or signing.BAD_SIGNATURE),
        ) from exc
    named = (parsed.manifest.generation, parsed.manifest.created_at)
    newer = [
        s.digest
        for s in store.list(key)
        if s.digest != parsed.digest and (s.manifest.generation, s.manifest.created_at) >= named
    ]
    if newer or parsed.manifest.tenant_uid != key:
        raise RecordRefused(
            f"the sleep record is unsigned but names a snapshot signed with key {key_id!r} that is not the "
            f"newest sleep snapshot of this tenant (newer: {', '.join(sorted(newer)) or 'none'}): its "
            "signature was removed or it was pointed at an older snapshot", signing.UNSIGNED,
        )  # fmt: skip


class SleepRecords:
    """`<store root>/sleeping/<key>.json`, written atomically (temp, fsync, rename, fsync dir);
    signed with the active key of the process's signing policy when it has one."""

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self.directory = store.root / "sleeping"

    def _path(self, key: str) -> Path:
        self.store.tenant_dir(key)  # the same validation as the blob's directory
        return self.directory / f"{key}.json"

    def write(self, key: str, record: SleepRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        temp = path.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
        body: dict[str, Any] = record.fields
        signer = signing.current().signer()  # None: signing off or no active key (unsigned, as before)
        if signer is not None:
            key_id, secret = signer
            mac = hmac.new(secret, record_message(key, record), hashlib.sha256).hexdigest()
            body |= {"key_id": key_id, "mac": mac}
        with open(temp, "w") as f:
            json.dump(body, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
        fsync_dir(self.directory)

    def read(self, key: str) -> SleepRecord | None:
        """The record as written (its signature is judged at wake: `check_record`); None when
        there is none or it is not a record at all."""
        try:
            raw = json.loads(self._path(key).read_text())
            known = {k: raw[k] for k in SleepRecord.__dataclass_fields__ if k in raw}
            record = SleepRecord(**known)
            if not isinstance(record.key_id, str) or not isinstance(record.mac, str):
                return None
            return record
        except (OSError, ValueError, TypeError, BadRequest):
            return None

    def remove(self, key: str) -> None:
        with contextlib.suppress(OSError, BadRequest):
            self._path(key).unlink()

    # --- claims: which namespace a sleep key belongs to (the sweep deletes only its own) ---

    def _claims(self, namespace: str) -> Path:
        return self.store.root / CLAIMS_DIR / (namespace or LOCAL_NAMESPACE)

    def claim(self, key: str, namespace: str) -> None:
        """File `key` under `namespace` (idempotent): its shards' sweep may then judge it. Written
        before the key's first blob, kept while the tenant lives (a wake removes its record, not this)."""
        self.store.tenant_dir(key)  # the same validation as the blob's directory
        directory = self._claims(namespace)
        path = directory / key
        if path.exists():
            return
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            fsync_dir(directory.parent)
        path.touch()
        fsync_dir(directory)

    def claimed(self, namespace: str) -> dict[str, Path]:
        """The sleep keys filed under `namespace`, with their claim files."""
        directory = self._claims(namespace)
        if not directory.is_dir():
            return {}
        return {p.name: p for p in directory.iterdir() if p.name.endswith(KEY_SUFFIX)}


@dataclass
class SleepParts:
    """What every sleeper of one shard shares; `open`/`close` are the shard's (they reserve and
    release GPU room around the device)."""

    store: SnapshotStore
    records: SleepRecords
    residency: Residency
    accelerator: Accelerator | None
    open: Callable[[TenantConfig, CompiledModule], Opened]
    close: Callable[[str, TenantInstancePool, TenantDevice | None], None]
    notify: Callable[[str, bool, str, int], None]  # (tenant, asleep, message, generation), any thread
    wall_clock: Callable[[], float] = time.time  # arrival history for prewarm (tenancy/prewarm.py)


class Sleeper:
    """One tenant's gate: counts its running invokes, sleeps it when idle, wakes it on demand."""

    def __init__(
        self,
        parts: SleepParts,
        config: TenantConfig,
        module: CompiledModule,
        pool: TenantInstancePool | None,
        device: TenantDevice | None,
        pending: Callable[[], int] = lambda: 0,
        record: SleepRecord | None = None,
    ) -> None:
        self.parts = parts
        self.name = config.name
        self.config = config
        self.module = module
        self.pool = pool
        self.device = device
        self.pending = pending  # admitted requests of this tenant (queued + running), loop-side count
        self.digest = record.digest if record is not None else ""  # the sleep blob, while asleep
        # The record `digest` came from (a restarted shard, a reload): judged at the wake. A digest
        # this process wrote itself is not read back, so it needs no check.
        self._record = record
        self._lock = threading.Lock()
        self._active = 0
        self._used = time.monotonic()
        self._epoch = 0  # completed wakes
        self._failure: tuple[int, TenantNotReady] | None = None
        self.closed = False  # set under the lock by close(): nothing opens a device for it again
        self._sleep_failures = 0  # consecutive failed captures
        self._sleep_retry_at = 0.0  # monotonic: no capture attempt before this after a failure
        self.pinned = False  # the shard sets it: idle.after is never (stays resident, never evicted)
        self.history = ArrivalHistory(parts.wall_clock)  # recorded when spec.idle.prewarm is history
        self.prewarmed = False  # awake by a prediction and not yet used: its next request is a hit
        # The slots it was prewarmed for, the newest last (bounded): never prewarmed twice for one.
        self.prewarm_slots: deque[tuple[int, int]] = deque(maxlen=PREWARMED_SLOTS_KEPT)
        self.last_wake: dict[
            str, float
        ] = {}  # seconds of the last wake: open (room + device + instances), restore
        if pool is not None:
            parts.residency.attach(self.name, self)

    @property
    def prewarm_slot(self) -> tuple[int, int] | None:
        """The slot it was last prewarmed for; set to None to forget them all (a new day, in benchmarks)."""
        return self.prewarm_slots[-1] if self.prewarm_slots else None

    @prewarm_slot.setter
    def prewarm_slot(self, slot: tuple[int, int] | None) -> None:
        self.prewarm_slots.clear()
        if slot is not None:
            self.prewarm_slots.append(slot)

    # --- what the residency ledger asks ---

    def last_used(self) -> float:
        return self._used

    def busy(self) -> bool:
        return self._active > 0 or self.pending() > 0

    @property
    def asleep(self) -> bool:
        return self.pool is None

    @property
    def key(self) -> str:
        return sleep_key(self.config)

    # --- the invoke path (the tenant's worker threads) ---

    def invoke(self, function: str, payload: Any) -> bytes:
        self._used = time.monotonic()
        if self.config.idle_prewarm == PREWARM_HISTORY:
            self.history.record()
        seen = self._epoch
        with self._lock:
            failure = self._failure
            if failure is not None and failure[0] > seen:
                raise failure[1]  # this request waited for a wake that failed
            if self.closed:
                raise self._unloaded()
            if self.pool is None:
                self._wake()
            elif self.prewarmed:
                self.prewarmed = False
                metrics.TENANT_PREWARMS.labels("hit").inc()
            pool = self.pool
            assert pool is not None
            self._active += 1
        try:
            return pool.invoke(function, payload)
        finally:
            with self._lock:
                self._active -= 1
                self._used = time.monotonic()

    # --- sleep ---

    def try_sleep(self, reason: str) -> bool:
        """Sleep now if nothing is running or queued; False otherwise (or if the capture failed, or
        failed less than its backoff ago: `sleep_backing_off`)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self.pool is None or self.busy() or self.sleep_backing_off():
                return False
            return self._sleep(reason)
        finally:
            self._lock.release()

    def sleep_backing_off(self) -> bool:
        """True while a failed capture's backoff runs: try_sleep refuses without trying."""
        return self._sleep_failures > 0 and time.monotonic() < self._sleep_retry_at

    def _sleep(self, reason: str) -> bool:
        pool, device, cfg, parts = self.pool, self.device, self.config, self.parts
        assert pool is not None
        if self.prewarmed and self.digest:
            return self._sleep_unused(reason)
        try:
            parts.records.claim(self.key, cfg.namespace)  # before its first blob: the sweep's proof
            result = capture_snapshot(
                parts.store, tenant_uid=self.key, module_sha256=cfg.module.sha256, generation=cfg.generation,
                pool=pool, device=device, accelerator=parts.accelerator, tenant=cfg.name,
            )  # fmt: skip
            parts.records.write(
                self.key, SleepRecord(result.digest, cfg.module.sha256, cfg.generation, cfg.name, time.time())
            )
        except (RuntimeFault, OSError) as exc:
            self._sleep_failures += 1
            backoff = min(SLEEP_RETRY_S * 2 ** (self._sleep_failures - 1), SLEEP_RETRY_MAX_S)
            self._sleep_retry_at = time.monotonic() + backoff
            metrics.TENANT_SLEEP_FAILURES.labels(reason).inc()
            log.warning("Failed putting Tenant to sleep name=%s reason=%s failures=%d retry_s=%.0f: %s",
                        self.name, reason, self._sleep_failures, backoff, exc)  # fmt: skip
            return False
        self._sleep_failures = 0
        previous, self.digest, self._record = self.digest, result.digest, None
        self.pool = self.device = None
        if self.prewarmed:  # woken for a request that did not come
            self.prewarmed = False
            metrics.TENANT_PREWARMS.labels("miss").inc()
        parts.close(self.name, pool, device)  # device closed, then its reservation given back
        if previous and previous != result.digest:
            with contextlib.suppress(OSError, RuntimeFault):
                parts.store.delete(self.key, previous)
        metrics.TENANT_SLEEPS.labels(reason).inc()
        metrics.TENANTS_ASLEEP.inc()
        where = "hot tier and disk" if result.hot else "disk"
        log.info("Put Tenant to sleep name=%s reason=%s bytes=%d in=%s", self.name, reason,
                 result.manifest.raw_bytes, where)  # fmt: skip
        parts.notify(self.name, True, self._asleep_message(result.manifest.raw_bytes, where), cfg.generation)
        return True

    def _sleep_unused(self, reason: str) -> bool:
        """A prewarm nobody called: no invoke ran since its wake (each clears `prewarmed` under the
        lock before it runs), so its state is still the blob it woke from, byte for byte. It sleeps
        back into that blob: a new record, no capture, so a wrong guess costs its wake only."""
        pool, device, cfg, parts = self.pool, self.device, self.config, self.parts
        assert pool is not None
        try:
            parts.store.path_of(self.key, self.digest)  # still there (nothing else removes it)
            parts.records.write(
                self.key, SleepRecord(self.digest, cfg.module.sha256, cfg.generation, cfg.name, time.time())
            )
        except (RuntimeFault, OSError):
            self.prewarmed = False  # capture it the usual way
            return self._sleep(reason)
        self.pool = self.device = None
        self.prewarmed = False
        metrics.TENANT_PREWARMS.labels("miss").inc()
        parts.close(self.name, pool, device)
        metrics.TENANT_SLEEPS.labels(reason).inc()
        metrics.TENANTS_ASLEEP.inc()
        log.info("Put Tenant back to sleep unused after a prewarm name=%s reason=%s", self.name, reason)
        parts.notify(self.name, True, "asleep in its snapshot again (prewarmed, not called); wakes on the "
                     "first request", cfg.generation)  # fmt: skip
        return True

    def _asleep_message(self, nbytes: int, where: str) -> str:
        return f"asleep ({nbytes} bytes of state in a snapshot, {where}); wakes on the first request"

    # --- wake (lock held) ---

    def _unloaded(self) -> TenantNotReady:
        return TenantNotReady(f"tenant {self.name} is no longer served by this shard", tenant=self.name,
                              reason=UNLOADED, retry_after_s=WAKE_RETRY_AFTER_S)  # fmt: skip

    def _wake(self) -> None:
        if self.closed:  # unloaded after the caller found it: open nothing for it
            raise self._unloaded()
        started = perf_counter()
        parts, cfg = self.parts, self.config
        pool, device = parts.open(cfg, self.module)  # reserves GPU room first (may evict); raises 429
        opened = perf_counter()
        source = "module"
        if self.digest:
            try:
                path = parts.store.path_of(self.key, self.digest)
                if self._record is not None and check_record(
                    self.key, self._record, path, signing.current(), parts.store
                ):
                    self._adopt_record(self._record)
                restored = restore_snapshot(
                    path, tenant_uid=self.key, module_sha256=cfg.module.sha256, pool=pool, device=device,
                    accelerator=parts.accelerator, memory_limit=cfg.limits.linear_memory_bytes,
                )  # fmt: skip
                source = restored.source
            except RecordRefused as exc:
                self._record_refused(pool, device, exc)
            except RuntimeFault as exc:
                self._wake_failed(pool, device, exc)
            except BaseException as exc:
                self._wake_interrupted(pool, device, exc)
        self.pool, self.device, self._record = pool, device, None
        parts.records.remove(self.key)
        self._epoch += 1
        took = perf_counter() - started
        self.last_wake = {"open": opened - started, "restore": took - (opened - started), "total": took}
        metrics.TENANT_WAKES.labels(source).inc()
        metrics.TENANT_WAKE_SECONDS.observe(took)
        metrics.TENANTS_ASLEEP.dec()
        parts.residency.attach(self.name, self)
        note = f"woke in {took * 1000:.1f} ms from " + {"hot": "the hot tier", "file": "disk"}.get(
            source, "its module (no snapshot)"
        )
        log.info("Woke Tenant name=%s source=%s ms=%.2f", self.name, source, took * 1000)
        parts.notify(self.name, False, note, cfg.generation)

    def _adopt_record(self, record: SleepRecord) -> None:
        """A legacy unsigned record `check_record` accepted: signed now (same fields), so a wake that
        fails on I/O and is retried, or a restart before the wake, finds a signed record."""
        with contextlib.suppress(OSError, RuntimeFault):
            self.parts.records.write(self.key, record)
        log.warning("Adopted a sleep record written before records were signed name=%s key=%s digest=%s: "
                    "it names the newest signed sleep snapshot of the tenant (signed now if a key is active)",
                    self.name, self.key, record.digest)  # fmt: skip

    def _wake_interrupted(
        self, pool: TenantInstancePool, device: TenantDevice | None, exc: BaseException
    ) -> None:
        """The restore failed on something other than a refused blob (an I/O error reading it): the
        device and its reservation go back now, the blob and its record stay (the state is not
        known to be bad), and the waiting requests fail retryably; the next request wakes again."""
        self.parts.close(self.name, pool, device)
        metrics.TENANT_WAKES.labels("failed").inc()
        log.error(
            "Failed waking Tenant name=%s digest=%s (kept for a retry): %r", self.name, self.digest, exc
        )
        if not isinstance(exc, Exception):
            raise exc
        fault = TenantNotReady(
            f"tenant {self.name} could not be woken: reading its snapshot failed ({exc}); its state is "
            "kept, retry", tenant=self.name, reason=WAKE_FAILED, retry_after_s=WAKE_RETRY_AFTER_S,
        )  # fmt: skip
        self._epoch += 1
        self._failure = (self._epoch, fault)
        raise fault from exc

    def _record_refused(
        self, pool: TenantInstancePool, device: TenantDevice | None, exc: RecordRefused
    ) -> None:
        """A sleep record that does not vouch for its blob: fail this wake's requests and serve from
        the module (what was just opened: nothing was restored into it). The record and the blobs
        stay where they are (whoever can write the volume must not be able to make us delete them)."""
        parts, cfg = self.parts, self.config
        fault = TenantNotReady(
            f"tenant {self.name} was not woken from its sleep snapshot: {exc}; it restarts from its "
            "module and its state at sleep is not restored (the record and snapshot are kept)",
            tenant=self.name, reason=WAKE_FAILED, sleep_record=exc.reason,
        )  # fmt: skip
        log.error("Refused the sleep record of Tenant name=%s key=%s digest=%s reason=%s (record and blob "
                  "kept): %s", self.name, self.key, self.digest, exc.reason, exc)  # fmt: skip
        metrics.TENANT_WAKES.labels("failed").inc()
        self.digest, self._record = "", None
        self._epoch += 1
        self._failure = (self._epoch, fault)
        self.pool, self.device = pool, device
        metrics.TENANTS_ASLEEP.dec()
        parts.residency.attach(self.name, self)
        parts.notify(self.name, False, f"restarted from its module: {fault.message}", cfg.generation)
        raise fault

    def _wake_failed(self, pool: TenantInstancePool, device: TenantDevice | None, exc: RuntimeFault) -> None:
        """A refused restore: fail this wake's requests, restart from the module (fresh state)."""
        parts, cfg = self.parts, self.config
        fault = TenantNotReady(
            f"tenant {self.name} could not be woken from its snapshot ({exc.message}); it restarts "
            "from its module and its state at sleep is lost", tenant=self.name, reason=WAKE_FAILED,
        )  # fmt: skip
        log.error("Failed waking Tenant name=%s digest=%s: %s", self.name, self.digest, exc.message)
        metrics.TENANT_WAKES.labels("failed").inc()
        parts.close(self.name, pool, device)
        parts.records.remove(self.key)
        with contextlib.suppress(OSError, RuntimeFault):
            parts.store.delete(self.key, self.digest)
        self.digest = ""
        self._epoch += 1
        self._failure = (self._epoch, fault)
        try:
            fresh, fresh_device = parts.open(cfg, self.module)
        except (RuntimeFault, QueueFull) as again:
            log.error("Failed restarting Tenant from its module name=%s: %s", self.name, again)
            parts.notify(self.name, True, f"asleep without state: {fault.message}", cfg.generation)
        else:
            self.pool, self.device = fresh, fresh_device
            metrics.TENANTS_ASLEEP.dec()
            parts.residency.attach(self.name, self)
            parts.notify(self.name, False, f"restarted from its module: {fault.message}", cfg.generation)
        raise fault

    # --- the shard's calls (event loop, or a load thread) ---

    def close(self, forget: bool) -> None:
        """The shard unloads the tenant (its queue drained): close what is open; with `forget`, drop
        the sleep blob too (a shard shutting down keeps it: the tenant sleeps on after a restart)."""
        with self._lock:
            self.closed = True
            pool, device, self.pool, self.device = self.pool, self.device, None, None
            if pool is not None:
                self.parts.close(self.name, pool, device)
            else:
                metrics.TENANTS_ASLEEP.dec()
            if forget:
                self._forget()

    def forget(self) -> None:
        """Drop the sleep blob and its record after `close` (the tenant was deleted meanwhile)."""
        with self._lock:
            self._forget()

    def _forget(self) -> None:
        if self.digest:
            # The store is shared by the shards: the tenant may already sleep on the shard it moved
            # to, under a record naming another blob. Only a record naming ours goes with it.
            record = self.parts.records.read(self.key)
            if record is None or record.digest == self.digest:
                self.parts.records.remove(self.key)
            with contextlib.suppress(OSError, RuntimeFault):
                self.parts.store.delete(self.key, self.digest)
            self.digest = ""

    def prewarm(self, need: int | None, slot: tuple[int, int]) -> bool:
        """Wake ahead of predicted use, into free room only: reserve `need` GPU bytes (its cap; None
        without an accelerator) only if they fit now, never putting another tenant to sleep. False
        when it is awake or busy waking, the room is not free, or the wake failed."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self.pool is not None or self.closed:
                return False
            residency = self.parts.residency
            if need is not None and not residency.try_admit(self.name, need):
                return False
            try:
                self._wake()  # the shard's open re-admits the same bytes: the room is already ours
            except (RuntimeFault, QueueFull) as exc:
                log.warning("Failed prewarming Tenant name=%s: %s", self.name, exc)
                if self.pool is None and residency.holds(self.name):
                    residency.release(self.name)
                return False
            self.prewarmed = True
            self.prewarm_slots.append(slot)
            self._used = time.monotonic()  # unused, it sleeps again after its idle.after: a miss
            metrics.TENANT_PREWARMS.labels("woken").inc()
            log.info("Prewarmed Tenant name=%s slot=%d", self.name, slot[1])
            return True
        finally:
            self._lock.release()

    def wake_now(self) -> None:
        """Wake outside a request (a Snapshot of a sleeping tenant needs its live state)."""
        with self._lock:
            if self.closed:
                raise self._unloaded()
            if self.pool is None:
                self._wake()


# --- sleep blobs no Tenant owns (a Tenant deleted while asleep and unserved, or while its shard was down) ---


@dataclass(frozen=True)
class Swept:
    """What one orphan sweep did."""

    removed: tuple[str, ...] = ()  # sleep keys whose record and blobs were removed
    left: int = 0  # orphans past the limit or still within the grace time: a later pass takes them
    stranded: dict[str, str] = field(default_factory=dict)  # kept key -> key id no longer in the ring
    strays: tuple[str, ...] = ()  # "<key>/<digest>": blobs of kept keys nothing names any more
    unowned: int = 0  # keys not filed under this namespace: another release's, or older; never touched


def sweep_orphans(
    parts: SleepParts,
    keep: Collection[str],
    *,
    namespace: str = "",
    held: Collection[tuple[str, str]] = (),
    limit: int = SWEEP_LIMIT,
    grace_s: float = SWEEP_GRACE_S,
    stray_grace_s: float = SWEEP_STRAY_GRACE_S,
    now: float | None = None,
) -> Swept:
    """Remove the sleep records and blobs of keys filed under `namespace` and not in `keep` (the
    shard's tenants and every live Tenant uid of the namespace), at most `limit` keys, none touched
    within `grace_s`; drop the stray blobs of kept keys (`_strays`); then count the sleep snapshots
    left by signing key and name those whose key the ring no longer lists.

    Only keys filed under `namespace` (SleepRecords.claim) are ever judged: a store shared with
    another release (another namespace, whose Tenants this shard cannot list) keeps that release's
    sleepers. A kept key found unfiled (written before keys were filed) is filed now: it is a live
    Tenant of this namespace. Other unfiled keys are left alone and counted (`Swept.unowned`).

    Crash-safe: a key's record goes first (unlinked, directory fsynced), so from then on nothing
    points at its blobs; they go next, each unlink atomic, then their directory, then its claim. A
    crash at any point leaves either a record with its complete blob (untouched) or blobs nobody
    points at, still filed, which the next pass removes. Blobs of a kept key (the same name
    re-created has another uid, hence another key) go only as strays."""
    store, records = parts.store, parts.records
    now = time.time() if now is None else now
    found = _keys_on_disk(store, records)
    claims = records.claimed(namespace)
    adopt = sorted(k for k in found if k in keep and k not in claims)
    for key in adopt:
        with contextlib.suppress(OSError, RuntimeFault):  # a read-only volume: the next pass files it
            records.claim(key, namespace)
    if adopt:
        claims = records.claimed(namespace)
    orphans = sorted(k for k in claims if k not in keep)
    # A claim alone (written just before a first capture) ages by its own mtime; a key with files by theirs.
    due = [k for k in orphans if now - _newest_mtime(found.get(k) or [claims[k]]) >= grace_s]
    removed: list[str] = []
    tier = HOT_TIERS.for_accelerator(parts.accelerator)
    for key in due[: max(0, limit)]:
        paths = found.get(key, [])
        try:
            _remove_key(store, records, key, paths, tier)
            claims[key].unlink(missing_ok=True)  # last: until here the key is still ours to finish
            fsync_dir(claims[key].parent)
        except OSError as exc:  # a read-only or failing volume: say so, try again next pass
            log.warning("Failed removing the sleep snapshot of a deleted Tenant key=%s: %s", key, exc)
            continue
        if paths:  # a claim alone (its tenant never slept) is no snapshot
            removed.append(key)
            metrics.SLEEP_SNAPSHOTS_SWEPT.inc()
            log.info("Removed the sleep snapshot of a Tenant that no longer exists key=%s", key)
    strays = _remove_strays(
        store, records, sorted(k for k in claims if k in keep), set(held), now, stray_grace_s, limit, tier
    )
    unowned = sum(1 for k in found if k not in keep and k not in claims)
    _note_unowned(namespace, unowned)
    stranded = _count_by_signing_key(store, records)
    left = sum(1 for k in orphans if k not in removed and found.get(k))
    return Swept(tuple(removed), left, stranded, tuple(strays), unowned)


_unowned_seen: dict[str, int] = {}


def _note_unowned(namespace: str, count: int) -> None:
    """Log (when it changes) how many sleep keys this namespace's sweep leaves alone."""
    if _unowned_seen.get(namespace, 0) != count:
        _unowned_seen[namespace] = count
        if count:
            log.info(
                "Left sleep snapshots this namespace's shards cannot prove are theirs count=%d "
                "namespace=%s (another release's in a shared store, or written before sleep keys were "
                "filed by namespace: docs/operator.md)",
                count,
                namespace or LOCAL_NAMESPACE,
            )


def _remove_strays(
    store: SnapshotStore,
    records: SleepRecords,
    keys: list[str],
    held: set[tuple[str, str]],
    now: float,
    grace_s: float,
    limit: int,
    tier: HotTier | None,
) -> list[str]:
    """Within kept keys, remove blobs that no sleep record names, no sleeper of this shard holds,
    that are not the key's newest blob and older than `grace_s`: left by a crash, or by a record a
    move's target ignored (shard.py `_install_asleep`). The newest is kept for a sleeper on another
    shard (awake, it may sleep back into the blob it woke from); the grace outlasts any move
    (SWEEP_STRAY_GRACE_S), so a source that may still wake from its blob after a rollback keeps it."""
    removed: list[str] = []
    for key in keys:
        directory = store.root / "tenants" / key
        try:
            blobs = [
                (p, d, p.stat().st_mtime) for p in directory.iterdir() if (d := digest_of(p)) is not None
            ]
        except OSError:  # no blobs (never slept, or swept by another shard meanwhile)
            continue
        if len(blobs) < 2:
            continue
        record = records.read(key)
        newest = max(blobs, key=lambda b: b[2])[0]
        for path, digest, mtime in blobs:
            if len(removed) >= limit:
                return removed
            if path == newest or (record is not None and record.digest == digest) or (key, digest) in held:
                continue
            if now - mtime < grace_s:
                continue
            if tier is not None:
                tier.drop(digest)
            path.unlink(missing_ok=True)
            fsync_dir(directory)
            removed.append(f"{key}/{digest}")
            log.info("Removed a sleep blob nothing names key=%s digest=%s", key, digest)
    return removed


def _keys_on_disk(store: SnapshotStore, records: SleepRecords) -> dict[str, list[Path]]:
    """Sleep key -> its paths: the record (and any temp file of one) and the blob directory."""
    found: dict[str, list[Path]] = {}
    if records.directory.is_dir():
        for path in records.directory.iterdir():
            key = path.name.removesuffix(".json").split(".tmp-", 1)[0]
            if key.endswith(KEY_SUFFIX):
                found.setdefault(key, []).append(path)
    tenants = store.root / "tenants"
    if tenants.is_dir():
        for path in tenants.iterdir():
            if path.name.endswith(KEY_SUFFIX) and path.is_dir():
                found.setdefault(path.name, []).append(path)
    return found


def _newest_mtime(paths: list[Path]) -> float:
    newest = 0.0
    for path in paths:
        with contextlib.suppress(OSError):
            newest = max(newest, path.stat().st_mtime)
            if path.is_dir():
                newest = max([newest, *(f.stat().st_mtime for f in path.iterdir())])
    return newest


def _remove_key(
    store: SnapshotStore, records: SleepRecords, key: str, paths: list[Path], tier: HotTier | None
) -> None:
    files = [p for p in paths if not p.is_dir()]
    for path in files:  # the record first: from here on nothing points at the blobs
        path.unlink(missing_ok=True)
    if files:
        fsync_dir(records.directory)
    for directory in (p for p in paths if p.is_dir()):
        # The store is shared by the shards (a ReadWriteMany claim): another shard's sweep may
        # remove the same orphan at the same time; whatever it removed first is gone either way.
        with contextlib.suppress(FileNotFoundError):
            for blob in directory.iterdir():
                digest = digest_of(blob)
                if tier is not None and digest is not None:
                    tier.drop(digest)
                blob.unlink(missing_ok=True)
            directory.rmdir()
        fsync_dir(directory.parent)


_warned_stranded: set[tuple[str, str]] = set()


def _count_by_signing_key(store: SnapshotStore, records: SleepRecords) -> dict[str, str]:
    """Set tensorwasm_sleep_snapshots{key_id, verifiable}; the keys whose blob is signed with a key
    id the current ring does not list (its wake would be refused UnknownKey: state lost)."""
    policy = signing.current()
    try:
        ring: signing.KeyRing | None = policy.current_ring() if policy.mode != "off" else None
    except signing.KeyRingError:
        ring = None  # an unreadable ring is the restore's to report; nothing to judge here
    counts: dict[tuple[str, str], int] = {}
    stranded: dict[str, str] = {}
    directory = records.directory
    for path in sorted(directory.glob(f"*{KEY_SUFFIX}.json")) if directory.is_dir() else []:
        key = path.name.removesuffix(".json")
        record = records.read(key)
        if record is None:
            continue
        try:
            parsed = read_manifest(store.path_of(key, record.digest))
        except (RuntimeFault, OSError, ValueError):
            continue  # a missing or damaged blob: its wake reports it (WakeFailed)
        key_id = parsed.signature.key_id if parsed.signature is not None else "unsigned"
        ok = ring is None or parsed.signature is None or key_id in ring.keys
        label = (key_id, "true" if ok else "false")
        counts[label] = counts.get(label, 0) + 1
        if not ok:
            stranded[key] = key_id
            if (key, key_id) not in _warned_stranded:
                _warned_stranded.add((key, key_id))
                log.warning(
                    "Found a sleeping Tenant whose snapshot is signed with a key no longer in the key "
                    "ring tenant=%s key=%s key_id=%s: its next wake restarts it from its module "
                    "(state lost) unless the key is listed again", record.tenant, key, key_id,
                )  # fmt: skip
    metrics.SLEEP_SNAPSHOTS.clear()
    for (key_id, verifiable), n in counts.items():
        metrics.SLEEP_SNAPSHOTS.labels(key_id, verifiable).set(n)
    return stranded
