"""The shard's tenant registry: the one path through which tenants are loaded, updated and unloaded.

Owns `Shard` and `ServedTenant`. Both tenant sources hand `TenantConfig`s to `Shard.sync` (the
desired set, level-triggered) or report a tenant they could not even parse with `Shard.report`.
Each tenant loads on its own: a bad module, a token clash or a failed GPU pool gives that tenant a
status reason and leaves every other tenant untouched; an update that fails keeps the previous
version serving. Tokens map to tenants through one precomputed dict keyed by the full
Authorization header value, so the hot path does a single lookup and a token only ever reaches
its own tenant.
Must not import aiohttp, wasmtime or cuda (engine/ and accel/ own those).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tensorwasm.runtime import metrics
from tensorwasm.runtime.errors import ModuleRejected, RuntimeFault
from tensorwasm.runtime.modules import ModuleLoader
from tensorwasm.runtime.tenancy.config import TenantConfig
from tensorwasm.runtime.tenancy.idle import Residency
from tensorwasm.runtime.tenancy.queue import TenantQueue

if TYPE_CHECKING:
    from tensorwasm.runtime.accel.base import Accelerator, AcceleratorHealth, TenantDevice
    from tensorwasm.runtime.engine import CompiledModule, Engine, TenantInstancePool
    from tensorwasm.runtime.sleep import Sleeper, SleepParts, Swept
    from tensorwasm.runtime.snapshots.store import SnapshotStore

log = logging.getLogger(__name__)

# Status reasons (CamelCase, as in status.runtime.reason).
LOADED = "ModuleLoaded"
LOADING = "Loading"
TOKEN_CONFLICT = "TokenConflict"
MISSING_FUNCTION = "MissingFunction"
LOAD_FAILED = "LoadFailed"
ASLEEP = "Asleep"  # served, sleeping in a snapshot: wakes on the first request (runtime/sleep.py)
# The idle scan looks this often relative to the shortest idle.after, within these bounds.
_IDLE_SCAN_MIN_S, _IDLE_SCAN_MAX_S = 0.05, 10.0


# Runs on a freshly opened tenant before it serves (e.g. a snapshot restore); returns a note for the
# status message. Failures inside it are the hook's to report: the tenant serves either way, unless
# the hook raises PrepareRefused (then it does not serve, and its status says why).
Prepare = Callable[[TenantConfig, "TenantInstancePool", "TenantDevice | None"], Awaitable[str]]


class PrepareRefused(Exception):
    """A prepare hook's verdict that the tenant must not serve yet (e.g. a move target that could not
    restore the move's Snapshot: serving fresh state would lose every write since it)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass(frozen=True)
class TenantStatus:
    """What the shard reports for one assigned tenant (status.runtime in Kubernetes)."""

    loaded: bool
    reason: str
    message: str = ""
    generation: int = 0
    gpu_bytes_in_use: int = 0


class ServedTenant:
    """A loaded tenant: everything the invoke hot path needs, precomputed."""

    def __init__(
        self,
        config: TenantConfig,
        pool: TenantInstancePool | None,
        device: TenantDevice | None,
        queue: TenantQueue,
        functions: frozenset[str],
        stats: dict[str, metrics.InvokeStats],
        sleeper: Sleeper | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self._pool = pool
        self._device = device
        self.queue = queue
        self.functions = functions
        self.max_body_bytes = config.limits.max_body_bytes
        self.sleeper = sleeper  # set when the shard can put it to sleep: every invoke passes its gate
        # Bound once: the worker calls invoke(function, payload); a sleeper's wakes the tenant first.
        self.invoke = sleeper.invoke if sleeper is not None else pool.invoke  # type: ignore[union-attr]
        self.stats = stats  # (function) -> counters; survives reloads of the same tenant

    @property
    def asleep(self) -> bool:
        return self.sleeper is not None and self.sleeper.asleep

    @property
    def pool(self) -> TenantInstancePool:
        """The live instance pool (TenantNotReady while asleep: `Shard.wake` first)."""
        pool = self.sleeper.pool if self.sleeper is not None else self._pool
        if pool is None:
            from tensorwasm.runtime.errors import TenantNotReady

            raise TenantNotReady(f"tenant {self.name} is asleep", tenant=self.name, reason=ASLEEP)
        return pool

    @property
    def device(self) -> TenantDevice | None:
        return self.sleeper.device if self.sleeper is not None else self._device

    @property
    def module(self) -> CompiledModule:
        return self.sleeper.module if self.sleeper is not None else self.pool.module

    def record(self, function: str, outcome: str, seconds: float | None) -> None:
        """Count one invoke (event-loop thread only); `seconds` is None when it never ran."""
        entry = self.stats.get(function)
        if entry is None:
            entry = self.stats[function] = metrics.InvokeStats()
        entry.record(outcome, seconds)

    def gpu_bytes_in_use(self) -> int:
        return self.device.bytes_in_use() if self.device is not None else 0


@dataclass
class Shard:
    """Tenant registry of one shard process (event-loop side; blocking work goes to threads)."""

    engine: Engine
    accelerator: Accelerator | None
    loader: ModuleLoader
    served: dict[str, ServedTenant] = field(default_factory=dict)
    by_auth: dict[str, ServedTenant] = field(default_factory=dict)  # "Bearer <token>" -> tenant
    waiting_auth: dict[str, str] = field(default_factory=dict)  # "Bearer <token>" -> unserved tenant
    held_auth: dict[str, str] = field(default_factory=dict)  # "Bearer <token>" -> tenant held (moving)
    # tenant -> every "Bearer <token>" of its Secret while held (rotation and read tokens too)
    holds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Called with a tenant's name when it is held (the HTTP app refuses its queued async jobs).
    on_hold: list[Callable[[str], object]] = field(default_factory=list)
    statuses: dict[str, TenantStatus] = field(default_factory=dict)  # every assigned tenant
    assigned: dict[str, TenantConfig] = field(default_factory=dict)  # last config seen per tenant
    stats: dict[str, dict[str, metrics.InvokeStats]] = field(default_factory=dict)  # tenant -> function
    synced: bool = False  # the source delivered its first full list
    health_poke: asyncio.Event = field(default_factory=asyncio.Event)  # an invoke saw AcceleratorFailed
    prepare: Prepare | None = None  # set by a source that restores snapshots
    # A source's: True for a tenant moving here with a Snapshot, which `prepare` restores; a sleep
    # record never stands in for it (_install_asleep).
    moving_in: Callable[[TenantConfig], bool] | None = None
    on_load_done: Callable[[], None] | None = None  # a source's hook: some tenant's load finished
    default_gpu_memory_bytes: int | None = None  # the GPU cap of a tenant that sets none (None: uncapped)
    # Idle sleep (runtime/sleep.py): a store enables it; tenants without spec.idle.after use
    # `idle_after_s` (None: never); awake tenants' caps stay within `resident_gpu_bytes` (None: no budget).
    sleep_store: SnapshotStore | None = None
    idle_after_s: float | None = None
    resident_gpu_bytes: int | None = None
    residency: Residency = field(default_factory=lambda: Residency(None))
    # The orphan sweep (runtime/sleep.py sweep_orphans) runs every `sweep_interval_s` once synced.
    # `live_uids` (the Kubernetes source's) lists every Tenant uid of the namespace: a tenant living
    # on another shard or moving here keeps its blob. None: the assigned set is the whole world.
    sweep_interval_s: float = 600.0
    # Prewarm (spec.idle.prewarm: history; tenancy/prewarm.py): at most this many tenants awake on a
    # prediction and not yet used at once; `wall_clock` dates their arrivals (tests set it).
    prewarm_tenants: int = 4
    wall_clock: Callable[[], float] = field(default=time.time)
    live_uids: Callable[[], Awaitable[Collection[str]]] | None = None
    # The namespace whose Tenants this shard serves (the Kubernetes source sets it; "" for a tenants
    # file): the sweep only judges sleep keys filed under it (a store may be shared by releases).
    namespace: str = ""
    _swept_at: float = float("-inf")
    _prewarming: asyncio.Lock = field(default_factory=asyncio.Lock)
    _sleep_parts: SleepParts | None = None
    _idle_task: asyncio.Task[None] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # tenant -> (the config being loaded, its task): at most one load per tenant at a time
    _loads: dict[str, tuple[TenantConfig, asyncio.Task[None]]] = field(default_factory=dict)
    _unwatched: set[asyncio.Task[None]] = field(default_factory=set)  # loads no sync call waits for
    # Refused tenants being unloaded with their state kept (review R3 K8): tenant -> (what was served,
    # the task capturing and closing it), outside the sync lock; `_capturing` lets one capture run at
    # a time; `_forget_after`: tenants that left (deleted) meanwhile, whose blob goes once captured.
    _refusing: dict[str, tuple[ServedTenant, asyncio.Task[None]]] = field(default_factory=dict)
    _capturing: asyncio.Lock = field(default_factory=asyncio.Lock)
    _forget_after: set[str] = field(default_factory=set)

    # --- what the sources call ---

    async def sync(
        self,
        configs: Sequence[TenantConfig],
        failed: Mapping[str, TenantStatus] | None = None,
        wait: bool | float = True,
        deleted: Collection[str] | None = None,
    ) -> None:
        """Make the served set equal to `configs`; `failed` are assigned tenants a source could not parse.

        `deleted` (a source that can tell): of the tenants leaving, those whose Tenant was deleted;
        only their sleep snapshots go with them. One that leaves without being deleted (moved, or
        unplaced because its spec became invalid) is unloaded deleting nothing: it may come back in
        its state, and the orphan sweep removes what its deletion later leaves. None: every tenant
        leaving is gone (the tenants file).

        Each tenant that needs loading gets its own task (one at a time per tenant), so one slow or
        stuck load never holds up another tenant or the next sync. With `wait` True, return once
        the loads this call started have finished (not those an earlier call started); with a
        number, wait at most that many seconds; with False, not at all (readiness says Loading
        meanwhile, and `on_load_done` fires when each ends).
        """
        failed = failed or {}
        async with self._lock:
            wanted = {c.name: c for c in configs}
            self.assigned = dict(wanted)
            for name in [n for n in self.statuses if n not in wanted and n not in failed]:
                await self._unload(name, forget=deleted is None or name in deleted)
                del self.statuses[name]
                self.stats.pop(name, None)
            refused: list[asyncio.Task[None]] = []
            for name, status in failed.items():
                # A deleted Secret must revoke access: a refused tenant stops serving at once. Its
                # Tenant still exists, so its state is kept (put to sleep when it can be, the sleep
                # blob and record left in place): fixing the spec or Secret brings it back as it
                # was. Only the Tenant's deletion drops it (review R2 G7). The capture runs in its
                # own task, one at a time, outside this lock (review R3 K8): a burst of refusals
                # holds up no other tenant's load nor the next sync.
                tenant = self.served.pop(name, None)
                if tenant is not None:
                    self._rebuild_auth()  # no new request reaches it from here on
                    refused.append(self._refuse(name, tenant))
                self.statuses[name] = status
                log.warning(
                    "Refused Tenant name=%s reason=%s message=%s", name, status.reason, status.message
                )
            # A tenant served with this very config needs nothing (the common case in a burst of
            # placements elsewhere): no task for it.
            changed = [c for c in wanted.values() if (t := self.served.get(c.name)) is None or t.config != c]
            tasks = [task for c in changed if (task := self._start_load(c)) is not None] + refused
            self._rebuild_auth()
            self.synced = True
            if self.sleep_store is not None and self._idle_task is None:
                self._idle_task = asyncio.get_running_loop().create_task(self._idle_scan())
        if wait is not False and tasks:
            _, pending = await asyncio.wait(tasks, timeout=None if wait is True else float(wait))
            self._unwatched.update(pending)
        elif tasks:
            self._unwatched.update(tasks)

    async def settled(self) -> None:
        """Wait until no tenant is loading nor being unloaded after a refusal (tests, benchmarks)."""
        while self._loads or self._refusing:
            await asyncio.wait([task for _, task in (*self._loads.values(), *self._refusing.values())])

    def _refuse(self, name: str, tenant: ServedTenant) -> asyncio.Task[None]:
        """Unload a refused tenant (already out of `served` and by_auth) keeping its state, in a task."""
        task = asyncio.get_running_loop().create_task(self._keep_state(name, tenant))
        self._refusing[name] = (tenant, task)
        return task

    async def _keep_state(self, name: str, tenant: ServedTenant) -> None:
        try:
            await self._stop(name, tenant, forget=False, keep_state=True)
            if name in self._forget_after and tenant.sleeper is not None:
                await asyncio.to_thread(tenant.sleeper.forget)  # deleted while it was being captured
        except Exception as exc:
            log.error("Failed unloading refused Tenant name=%s", name, exc_info=exc)
        finally:
            task = asyncio.current_task()
            entry = self._refusing.get(name)
            if entry is not None and entry[1] is task:
                del self._refusing[name]
                self._forget_after.discard(name)
            self._unwatched.discard(task)  # type: ignore[arg-type]

    def _start_load(self, config: TenantConfig) -> asyncio.Task[None] | None:
        """Start loading `config` (after any load of that tenant still running); None if it is
        already being loaded."""
        pending = self._loads.get(config.name)
        if pending is not None and pending[0] == config:
            return None
        if config.name not in self.served:
            self.statuses[config.name] = TenantStatus(False, LOADING, "fetching module", config.generation)
        previous = pending[1] if pending is not None else None
        task = asyncio.get_running_loop().create_task(self._load(config, previous))
        self._loads[config.name] = (config, task)
        return task

    async def _load(self, config: TenantConfig, previous: asyncio.Task[None] | None) -> None:
        """One tenant's load, after the one before it (a superseded load finishes first, bounded
        by its deadlines); a bug in it stays with this tenant."""
        name = config.name
        try:
            if previous is not None:
                await asyncio.wait([previous])
            refusing = self._refusing.get(name)
            if refusing is not None:  # back before its refusal's capture ended: load from that state
                await asyncio.wait([refusing[1]])
            if self.assigned.get(name) == config:  # not superseded or removed meanwhile
                await self._apply(config)
        except Exception as exc:
            log.error("Failed loading Tenant name=%s", name, exc_info=exc)
            if self.assigned.get(name) == config:
                old = self.served.get(name)
                self._fail(config, LOAD_FAILED, f"{type(exc).__name__}: {exc}", keep=old)
        finally:
            entry = self._loads.get(name)
            if entry is not None and entry[1] is asyncio.current_task():
                del self._loads[name]
            self._rebuild_auth()
            task = asyncio.current_task()
            if task in self._unwatched:  # nobody waited for this one: tell the source it ended
                self._unwatched.discard(task)  # type: ignore[arg-type]
                if self.on_load_done is not None:
                    self.on_load_done()

    # --- the move barrier (sources/kube.py decides when) ---

    def hold(self, name: str) -> bool:
        """Stop admitting `name`'s new requests (503 tenant_moving with Retry-After, also after it is
        unloaded, until `release`); in-flight ones finish. False: not served here, nothing held."""
        if name not in self.holds:
            tenant = self.served.get(name)
            if tenant is None:
                return False
            self.holds[name] = _headers(tenant.config)
            self._rebuild_auth()
            log.info("Held Tenant name=%s (moving)", name)
            for hook in self.on_hold:
                try:
                    hook(name)
                except Exception as exc:  # a hook's bug must not undo the hold
                    log.error("Failed a hold hook of Tenant name=%s", name, exc_info=exc)
        return True

    def release(self, name: str) -> None:
        """Admit `name` again (a move rolled back), or forget the token of a tenant that left."""
        if self.holds.pop(name, None) is not None:
            self._rebuild_auth()
            log.info("Released Tenant name=%s", name)

    def drained(self, name: str) -> bool:
        """No invoke of `name` admitted and unfinished (nothing to lose by capturing it now)."""
        tenant = self.served.get(name)
        return tenant is None or tenant.queue.outstanding == 0

    def __post_init__(self) -> None:
        # Without a store nothing can sleep, so a budget could only refuse: none then.
        self.residency = Residency(self.resident_gpu_bytes if self.sleep_store is not None else None)

    # --- idle sleep (runtime/sleep.py does the work; these are the event-loop side) ---

    def _parts(self) -> SleepParts | None:
        if self.sleep_store is None:
            return None
        if self._sleep_parts is None:
            from tensorwasm.runtime.sleep import SleepParts, SleepRecords

            loop = asyncio.get_running_loop()

            def notify(name: str, asleep: bool, message: str, generation: int) -> None:
                loop.call_soon_threadsafe(self._slept_or_woke, name, asleep, message, generation)

            self._sleep_parts = SleepParts(
                self.sleep_store, SleepRecords(self.sleep_store), self.residency, self.accelerator,
                self._open, self._close_parts, notify, self.wall_clock,
            )  # fmt: skip
        return self._sleep_parts

    def _slept_or_woke(self, name: str, asleep: bool, message: str, generation: int) -> None:
        tenant = self.served.get(name)
        if tenant is None or tenant.config.generation != generation:
            return
        if not asleep:
            message = f"serving {len(tenant.functions)} function(s); {message}"
        message = _with_notes(message, tenant.config)
        self.statuses[name] = TenantStatus(True, ASLEEP if asleep else LOADED, message, generation)
        if self.on_load_done is not None:
            self.on_load_done()  # the source reports it (Kubernetes: status.runtime, phase Asleep)

    def idle_after(self, config: TenantConfig) -> float | None:
        """Seconds without a request before `config`'s tenant sleeps; None: never."""
        from tensorwasm.api.tenant import idle_seconds

        return self.idle_after_s if config.idle_after is None else idle_seconds(config.idle_after)

    async def _idle_scan(self) -> None:
        """Put tenants idle past their idle.after to sleep, one at a time, off the event loop."""
        import time

        while True:
            afters = [a for t in self.served.values() if t.sleeper is not None
                      and (a := self.idle_after(t.config)) is not None]  # fmt: skip
            period = min(afters, default=_IDLE_SCAN_MAX_S) / 4
            await asyncio.sleep(min(max(period, _IDLE_SCAN_MIN_S), _IDLE_SCAN_MAX_S))
            now = time.monotonic()
            for tenant in list(self.served.values()):
                sleeper, after = tenant.sleeper, self.idle_after(tenant.config)
                if sleeper is None or after is None or sleeper.asleep or sleeper.busy():
                    continue
                if tenant.name in self.holds:  # at a move barrier: the move's Snapshot captures it
                    continue
                if now - sleeper.last_used() >= after and self.served.get(tenant.name) is tenant:
                    try:
                        await asyncio.to_thread(sleeper.try_sleep, "idle")
                    except Exception as exc:  # one tenant's trouble must not stop the scan
                        log.warning("Failed idle sleep of Tenant name=%s: %s", tenant.name, exc, exc_info=exc)
            try:
                await self.prewarm()
            except Exception as exc:  # a guess gone wrong must not stop the scan
                log.warning("Failed prewarming Tenants: %s", exc, exc_info=exc)
            if self.synced and now - self._swept_at >= self.sweep_interval_s:
                self._swept_at = now
                try:
                    await self.sweep_sleep_blobs()
                except Exception as exc:  # the API server away (live uids): sweep nothing, try later
                    log.warning("Skipped sweeping sleep snapshots: %s", exc)

    async def prewarm(self) -> list[str]:
        """Wake sleepers predicted to be called soon (spec.idle.prewarm: history), into free GPU room
        only (never putting another tenant to sleep), at most `prewarm_tenants` prewarmed and unused
        at once; the names woken."""
        async with self._prewarming:  # one pass at a time: each counts the budget the last one left
            return await self._prewarm()

    async def _prewarm(self) -> list[str]:
        from tensorwasm.api.tenant import PREWARM_HISTORY
        from tensorwasm.runtime.tenancy.prewarm import Candidate, choose

        sleepers = {t.name: t.sleeper for t in self.served.values()
                    if t.sleeper is not None and t.config.idle_prewarm == PREWARM_HISTORY}  # fmt: skip
        room = self.prewarm_tenants - sum(1 for s in sleepers.values() if s.prewarmed and not s.asleep)
        candidates = [
            Candidate(n, s.history, tuple(s.prewarm_slots)) for n, s in sleepers.items() if s.asleep
        ]
        woken = []
        for name, slot in choose(candidates, self.wall_clock(), room) if candidates else []:
            tenant = self.served.get(name)
            if tenant is None or tenant.sleeper is None:
                continue
            lim = tenant.config.limits
            cap = lim.gpu_memory_bytes if lim.gpu_memory_bytes is not None else self.default_gpu_memory_bytes
            need = None if self.accelerator is None else cap or 0
            if await asyncio.to_thread(tenant.sleeper.prewarm, need, slot):
                woken.append(name)
        return woken

    async def sweep_sleep_blobs(self, **options: Any) -> Swept | None:
        """Remove sleep snapshots no Tenant of this shard's namespace owns (only keys filed under it),
        and blobs of its tenants' keys that nothing names; tell the tenants whose snapshot the key ring
        can no longer verify. `options`: sweep_orphans' limit, grace_s, stray_grace_s, now (tests)."""
        from tensorwasm.runtime.sleep import sleep_key, sleep_key_of, sweep_orphans

        parts = self._parts()
        if parts is None or not self.synced:
            return None
        live = await self.live_uids() if self.live_uids is not None else ()
        keep = {sleep_key(c) for c in self.assigned.values()} | {sleep_key_of(u) for u in live if u}
        keep |= {t.sleeper.key for t in self.served.values() if t.sleeper is not None}
        keep |= {sleep_key_of("local-" + n) for n in self.statuses}  # refused by the source, not gone
        held = {
            (t.sleeper.key, t.sleeper.digest) for t in self.served.values() if t.sleeper and t.sleeper.digest
        }
        swept = await asyncio.to_thread(
            sweep_orphans, parts, keep, namespace=self.namespace, held=held, **options
        )
        for tenant in self.served.values():
            key_id = swept.stranded.get(tenant.sleeper.key) if tenant.sleeper is not None else None
            if key_id is not None and tenant.asleep:
                self._slept_or_woke(tenant.name, True, (
                    f"asleep in a snapshot signed with key {key_id!r}, which this shard's key ring no "
                    "longer lists: its next wake restarts it from its module (state lost) unless the "
                    "key is listed again"), tenant.config.generation)  # fmt: skip
        return swept

    async def wake(self, name: str) -> None:
        """Wake a sleeping tenant now (outside a request: e.g. a Snapshot wants its live state)."""
        tenant = self.served.get(name)
        if tenant is not None and tenant.sleeper is not None and tenant.sleeper.asleep:
            await asyncio.to_thread(tenant.sleeper.wake_now)

    async def sleep(self, name: str) -> bool:
        """Put a tenant to sleep now if it is idle (tests, benchmarks, the CLI); False if it did not."""
        tenant = self.served.get(name)
        if tenant is None or tenant.sleeper is None:
            return False
        return await asyncio.to_thread(tenant.sleeper.try_sleep, "idle")

    def status(self, name: str) -> TenantStatus | None:
        """The current report for a tenant, with live GPU bytes."""
        status = self.statuses.get(name)
        tenant = self.served.get(name)
        if status is None or tenant is None:
            return status
        return TenantStatus(
            status.loaded, status.reason, status.message, status.generation, tenant.gpu_bytes_in_use()
        )

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready once the first list is applied, nothing is still loading, and the accelerator is ok.

        A tenant whose module was refused counts as settled: failing readiness for it would take
        every other tenant on this shard out of its Service.
        """
        loading = sorted(n for n, s in self.statuses.items() if s.reason == LOADING)
        failed = {n: s.reason for n, s in self.statuses.items() if not s.loaded and s.reason != LOADING}
        health = self.health()
        ready = self.synced and not loading and (health is None or health.ok)
        detail: dict[str, Any] = {
            "ready": ready,
            "synced": self.synced,
            "loaded": sorted(self.served),
            "loading": loading,
            "failed": failed,
        }
        if health is not None:
            detail["accelerator"] = {"ok": health.ok, "reason": health.reason, "mps": health.mps}
        return ready, detail

    def health(self) -> AcceleratorHealth | None:
        return self.accelerator.health() if self.accelerator is not None else None

    def invoke_report(self) -> Iterator[tuple[str, str, metrics.InvokeStats]]:
        for tenant, functions in self.stats.items():
            for function, stats in functions.items():
                yield tenant, function, stats

    def load_report(self) -> Iterator[metrics.TenantLoad]:
        for name, status in self.statuses.items():
            t = self.served.get(name)
            yield metrics.TenantLoad(
                name,
                t.queue.depth if t else 0,
                t.queue.in_flight if t else 0,
                status.loaded,
                t.queue.capacity if t else 0,
            )

    async def close(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
            self._idle_task = None
        async with self._lock:
            self.assigned = {}  # loads still running discard what they open
            await self.settled()  # refused tenants' captures end too: their state is kept
            for name in list(self.served):
                await self._unload(name, forget=False)  # sleepers sleep on: their records stay
            self.statuses.clear()

    # --- the one load path ---

    async def _apply(self, config: TenantConfig) -> None:
        name = config.name
        old = self.served.get(name)
        if old is not None and old.config == config:
            return
        clash = self._token_owner(config)
        if clash is not None:
            self._fail(config, TOKEN_CONFLICT, f"the token is already used by tenant {clash}", keep=old)
            return
        if old is not None and old.config.same_code(config):
            missing = _missing(config.functions, old.module.functions)
            if missing:
                self._fail(config, MISSING_FUNCTION, missing, keep=old)
                return
            if old.sleeper is not None:
                old.sleeper.config = config
            self._install(config, old._pool, old._device, old.queue, sleeper=old.sleeper)
            return
        try:
            module = await self.loader.load(config.module)
        except ModuleRejected as exc:
            self._fail(config, str(exc.details.get("reason", "ModuleRejected")), exc.message, keep=old)
            return
        if not self._still_wanted(config):
            return
        if await self._install_asleep(config, module, old):
            return
        if old is not None:
            # The accelerator holds one device per tenant name, so the old version's device (and
            # its GPU buffers) goes before the new one opens; the old module stays compiled, and
            # if the new version fails to open, the old one is opened again and keeps serving.
            await self._unload(name)
        try:
            pool, device = await asyncio.to_thread(self._open, config, module)
        except RuntimeFault as exc:
            await self._fall_back(config, _reason_of(exc), exc.message, old)
            return
        missing = _missing(config.functions, pool.functions())
        if missing:
            await asyncio.to_thread(self._close_parts, name, pool, device)
            await self._fall_back(config, MISSING_FUNCTION, missing, old)
            return
        try:
            note = await self._prepare(config, pool, device)
        except PrepareRefused as exc:
            await asyncio.to_thread(self._close_parts, name, pool, device)
            await self._fall_back(config, exc.reason, exc.message, old)
            return
        clash = self._token_owner(config)  # another tenant may have taken the token while we loaded
        if clash is not None or not self._still_wanted(config):
            await asyncio.to_thread(self._close_parts, name, pool, device)
            if clash is not None:
                await self._fall_back(
                    config, TOKEN_CONFLICT, f"the token is already used by tenant {clash}", old
                )
            return
        self._install(config, pool, device, self._new_queue(config), note)

    async def _install_asleep(
        self, config: TenantConfig, module: CompiledModule, old: ServedTenant | None
    ) -> bool:
        """Serve `config` asleep when its sleep blob is usable (a restarted shard, a moved tenant, new
        limits on a sleeper): True if done. A blob of another module is dropped: the tenant loads
        (and later wakes) from its new module, never from an incompatible snapshot."""
        from tensorwasm.runtime.sleep import Sleeper, sleep_key

        parts = self._parts()
        if parts is None:
            return False
        key = sleep_key(config)
        record = parts.records.read(key)
        if record is None:
            return False
        with contextlib.suppress(OSError, RuntimeFault):  # a record from before keys were filed
            parts.records.claim(key, config.namespace)
        if self.moving_in is not None and self.moving_in(config):
            # The move's Snapshot was captured at the source's barrier, and nothing was written after
            # it: it is the newest state. A record is older (left by a crash) or the source's own,
            # written while it held the tenant (its blob is the source's to keep or delete: a rolled
            # back move may wake from it there). Only the record goes, so no later start here
            # serves that state.
            parts.records.remove(key)
            log.info("Ignored the sleep record of Tenant name=%s: it is moving here with a Snapshot "
                     "slept_at=%.0f", config.name, record.slept_at)  # fmt: skip
            return False
        if record.module_sha256 != config.module.sha256 or _missing(config.functions, module.functions):
            if old is not None:
                await self._unload(config.name)  # its blob goes with it
            else:
                parts.records.remove(key)
                parts.store.delete(key, record.digest)
            log.info("Dropped the sleep snapshot of Tenant name=%s: its module changed", config.name)
            return False
        if old is not None:
            if old.sleeper is None or not old.sleeper.asleep:
                return False  # awake: the normal reload path
            await self._unload(config.name, forget=False)
        queue = self._new_queue(config)
        sleeper = Sleeper(parts, config, module, None, None, lambda: queue.outstanding, record)
        metrics.TENANTS_ASLEEP.inc()
        self._install(config, None, None, queue, sleeper=sleeper)
        return True

    def _still_wanted(self, config: TenantConfig) -> bool:
        """False once a later sync replaced or removed this config: its load must not install."""
        return self.assigned.get(config.name) == config

    def _new_queue(self, config: TenantConfig) -> TenantQueue:
        lim = config.limits
        return TenantQueue(config.name, lim.max_concurrency, lim.queue_length, asyncio.get_running_loop())

    async def _fall_back(
        self, config: TenantConfig, reason: str, message: str, old: ServedTenant | None
    ) -> None:
        """The new version could not open: re-open the version that served before, if any."""
        if old is not None and self.served.get(config.name) is None and self._still_wanted(config):
            try:
                pool, device = await asyncio.to_thread(self._open, old.config, old.module)
            except RuntimeFault as exc:
                log.error("Failed re-opening the previous version of Tenant name=%s: %s", config.name, exc)
            else:
                self._install(old.config, pool, device, self._new_queue(old.config))
                self._fail(config, reason, message, keep=self.served[config.name])
                return
        self._fail(config, reason, message, keep=None)

    async def _prepare(
        self, config: TenantConfig, pool: TenantInstancePool, device: TenantDevice | None
    ) -> str:
        if self.prepare is None:
            return ""
        try:
            return await self.prepare(config, pool, device)
        except PrepareRefused:
            raise
        except Exception as exc:  # a restore problem must not keep the tenant down
            log.warning("Skipped preparing Tenant name=%s: %s", config.name, exc, exc_info=exc)
            return f"not restored: {exc}"

    def _install(
        self,
        config: TenantConfig,
        pool: TenantInstancePool | None,
        device: TenantDevice | None,
        queue: TenantQueue,
        note: str = "",
        sleeper: Sleeper | None = None,
    ) -> None:
        # No await between the token check and this point: two loads cannot both claim one token.
        parts = self._parts()
        if sleeper is None and parts is not None and pool is not None:
            from tensorwasm.runtime.sleep import Sleeper

            sleeper = Sleeper(parts, config, pool.module, pool, device, lambda: queue.outstanding)
        module = sleeper.module if sleeper is not None else pool.module  # type: ignore[union-attr]
        exported = frozenset(config.functions or module.functions)
        stats = self.stats.setdefault(config.name, {})
        tenant = ServedTenant(config, pool, device, queue, exported, stats, sleeper)
        if sleeper is not None:
            sleeper.pinned = self.idle_after(config) is None
        self.served[config.name] = tenant
        self._rebuild_auth()
        if tenant.asleep:
            message = _with_notes("asleep in a snapshot; wakes on the first request", config)
            status = TenantStatus(True, ASLEEP, message, config.generation)
        else:
            message = f"serving {len(exported)} function(s)" + (f"; {note}" if note else "")
            status = TenantStatus(True, LOADED, _with_notes(message, config), config.generation)
        self.statuses[config.name] = status
        log.info(
            "Loaded Tenant name=%s generation=%d sha256=%s",
            config.name,
            config.generation,
            config.module.sha256[:12],
        )

    def _open(
        self, config: TenantConfig, module: CompiledModule
    ) -> tuple[TenantInstancePool, TenantDevice | None]:
        from tensorwasm.runtime.engine import GuestLimits, TenantInstancePool

        lim = config.limits
        device = None
        if self.accelerator is not None:
            cap = lim.gpu_memory_bytes if lim.gpu_memory_bytes is not None else self.default_gpu_memory_bytes
            # The cap is reserved before the device opens and given back after it closes (_close_parts):
            # the caps of open devices never exceed the resident budget (tenancy/idle.py).
            self.residency.admit(config.name, cap or 0, max(1.0, lim.timeout_ms / 1000))
            try:
                device = self.accelerator.open_tenant(config.name, cap, dict(config.kernels) or None)
            except BaseException:
                self.residency.release(config.name)
                raise
        limits = GuestLimits(
            memory_bytes=lim.linear_memory_bytes,
            timeout_s=lim.timeout_ms / 1000,
            max_instances=lim.max_concurrency,
            table_elements=lim.max_table_elements,
            max_output_bytes=lim.max_output_bytes,
            host_calls_per_invoke=lim.host_calls_per_invoke,
            host_calls_per_s=lim.host_calls_per_second,
            log_bytes_per_invoke=lim.log_bytes_per_invoke,
            log_bytes_per_s=lim.log_bytes_per_second,
        )
        try:
            return TenantInstancePool(self.engine, module, limits, device, config.name), device
        except BaseException:
            if self.accelerator is not None:
                self.accelerator.close_tenant(config.name)
                self.residency.release(config.name)
            raise

    async def _unload(self, name: str, forget: bool = True, keep_state: bool = False) -> None:
        """Stop serving `name`; with `forget`, a sleeper's blob goes too (it left or changed module);
        with `keep_state`, an awake sleeper is first put to sleep (its live state captured), so that
        serving it again later wakes it as it was."""
        tenant = self.served.pop(name, None)
        if tenant is None:
            if forget and name in self._refusing:
                self._forget_after.add(name)  # its refusal's task drops the blob once captured
            return
        self._rebuild_auth()  # no new request reaches it from here on
        await self._stop(name, tenant, forget, keep_state)

    async def _stop(self, name: str, tenant: ServedTenant, forget: bool, keep_state: bool) -> None:
        """The rest of `_unload`, for a tenant already out of `served`; captures one at a time."""
        tenant.queue.close()
        await tenant.queue.drain()
        if tenant.sleeper is not None:
            if keep_state and not tenant.sleeper.asleep and name not in self._forget_after:
                async with self._capturing:
                    kept = await asyncio.to_thread(tenant.sleeper.try_sleep, "refused")
                if not kept:
                    log.warning(
                        "Failed keeping the state of a refused Tenant name=%s: it could not be put to "
                        "sleep (see the sleep failure above); it restarts fresh",
                        name,
                    )
            await asyncio.to_thread(tenant.sleeper.close, forget)
        else:
            await asyncio.to_thread(self._close_parts, name, tenant.pool, tenant.device)
        log.info("Unloaded Tenant name=%s", name)

    def _close_parts(self, name: str, pool: TenantInstancePool, device: TenantDevice | None) -> None:
        pool.close()
        if device is not None and self.accelerator is not None:
            self.accelerator.close_tenant(name)
            self.residency.release(name)

    def _fail(self, config: TenantConfig, reason: str, message: str, keep: ServedTenant | None) -> None:
        if not self._still_wanted(config):  # superseded or removed meanwhile: nothing to report
            log.info("Dropped the result of a superseded load Tenant name=%s reason=%s", config.name, reason)
            return
        if keep is not None:
            message = f"{message}; still serving generation {keep.config.generation}"
        self.statuses[config.name] = TenantStatus(
            keep is not None, reason, message, keep.config.generation if keep else config.generation
        )
        log.warning("Refused Tenant name=%s reason=%s message=%s", config.name, reason, message)

    def _token_owner(self, config: TenantConfig) -> str | None:
        mine = {token for _, token, _ in config.all_tokens()}  # every key of its Secret (issue 14)
        for other in self.served.values():
            if other.name != config.name and any(t in mine for _, t, _ in other.config.all_tokens()):
                return other.name
        return None

    def _rebuild_auth(self) -> None:
        # Replaced wholesale, never mutated: a request reading the old dict sees a consistent view.
        for name in self.holds:
            if (t := self.served.get(name)) is not None:
                self.holds[name] = _headers(t.config)  # its Secret may have changed while held
        self.by_auth = {
            f"Bearer {t.config.token}": t for t in self.served.values() if t.name not in self.holds
        }
        self.held_auth = {header: name for name, headers in self.holds.items() for header in headers}
        # Every token of an assigned tenant not (yet) served: "not ready, retry", never 401 (which
        # would count against the client's address as a failed authentication).
        self.waiting_auth = {
            header: c.name
            for c in self.assigned.values()
            if c.name not in self.served
            for header in _headers(c)
            if header not in self.by_auth and header not in self.held_auth
        }


def _with_notes(message: str, config: TenantConfig) -> str:
    """A serving tenant's status message with what its source let through with a warning."""
    return "; ".join((message, *config.notes))


def _headers(config: TenantConfig) -> tuple[str, ...]:
    """The Authorization header of every token of `config` (its Secret's keys), the primary first."""
    return tuple(f"Bearer {token}" for _, token, _ in config.all_tokens())


def _missing(wanted: Iterable[str], exported: Iterable[str]) -> str:
    missing = sorted(set(wanted) - set(exported))
    if not missing:
        return ""
    return f"function(s) {', '.join(missing)} not exported by the module (it exports {sorted(exported)})"


def _reason_of(exc: RuntimeFault) -> str:
    reason = exc.details.get("reason")
    if isinstance(reason, str):
        return reason
    return "".join(part.capitalize() for part in exc.kind.split("_"))
