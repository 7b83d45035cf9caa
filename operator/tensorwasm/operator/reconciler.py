"""Level-triggered reconciliation of Tenants and of the shard set, shared by every kopf handler.

Owns the operator's in-memory view (latest Tenant bodies, owned Services/Secrets as last seen,
the placement Ledger) and the reconcile loop: finalizer -> spec check -> placement -> token
Secret -> Service -> status. Each step compares the desired state with what is known and writes
only differences, so reconciling an unchanged Tenant makes no API call that writes. Failures are
retried with backoff; a restarted operator re-lists and converges (placements persist in
status.shard, owned objects carry ownerReferences). Must not import kopf (handlers/ adapt it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp

from tensorwasm.api.conditions import (
    INSUFFICIENT_CAPACITY,
    NO_SHARDS,
    Placement,
    desired_status,
    status_patch,
)
from tensorwasm.api.group import API_VERSION, FINALIZER, LABEL_TENANT, SNAPSHOT, TENANT
from tensorwasm.api.names import shard_ordinal, shard_pod_name, tenant_service_name
from tensorwasm.api.snapshot import is_deleting, phase_of, tenant_of
from tensorwasm.api.stamps import now_rfc3339
from tensorwasm.api.tenant import Tenant, parse_tenant
from tensorwasm.kube.client import KubeApi, KubeError, resource_path, task_writes
from tensorwasm.operator import health
from tensorwasm.operator.desired.meta import MANAGED_SELECTOR
from tensorwasm.operator.desired.shards import (
    build_owner_reference,
    build_shard_service,
    build_shard_statefulset,
)
from tensorwasm.operator.desired.tenant import build_tenant_service, build_token_secret, tenant_endpoint
from tensorwasm.operator.moves import MoveStrategy, SnapshotMove
from tensorwasm.operator.placement import Ledger, Move, ranked
from tensorwasm.operator.roll import ShardRoll
from tensorwasm.operator.settings import OperatorSettings
from tensorwasm.operator.snapshots import (
    PERIODIC,
    build_snapshot,
    last_snapshot,
    periodic_wait_s,
    retention_victims,
    short_id,
    snapshot_name,
    tenant_not_found_status,
)
from tensorwasm.planner.admission import (
    ShardCapacity,
    ShardUsage,
    TenantDemand,
    binding_resource,
    gpu_bytes_needed,
    tenant_demand,
)

log = logging.getLogger("tensorwasm.operator")

JSON = dict[str, Any]
TENANTS = (API_VERSION, TENANT.plural)
SNAPSHOTS = (API_VERSION, SNAPSHOT.plural)
TRANSIENT = (KubeError, aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)
MAX_BACKOFF_S = 60.0
WARNING_PHASES = ("Pending", "Degraded", "Failed")
# Idle sleep flips a tenant between these all day: no Event for that (the sleep/wake metrics count it).
QUIET_FLIPS = frozenset({"Ready", "Asleep"})
SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED_SELECTOR.items())
# What a placed tenant whose spec is invalid reserves when the ledger has no earlier demand of it
# (a restarted operator): nothing. Its last valid spec was only in the old process's memory, and
# the invalid spec's own numbers are what was refused (a hostile gpuMemory must not reserve a shard).
# Its shard holds it asleep (refused: no instance, no GPU memory); the fixed spec's demand is
# assigned at its next reconcile, on the same shard even when that overfills it (sticky, as a grown
# demand), so the cost is only that new tenants may take its room meanwhile.
INVALID_DEMAND = TenantDemand(gpu_memory_bytes=0, sm_percent=0, host_memory_bytes=0)
OVER_MODEL = "OverAdmissionModel"  # the Event's reason when a roll or scale-in carries tenants past it


def fits_as_admitted(capacity: ShardCapacity, used: ShardUsage, demand: TenantDemand) -> bool:
    """The demand fits next to `used` by the admission before 52c3b4f: sleepers counted at their
    mean awake share, ceil(f x caps), not the binomial tail. Shards filled then (80 sleepers where the
    tail allows 32) hold what it admitted; a roll or scale-in that moves a shard's tenants onto an
    empty one one-for-one always fits by it, so it never waits for room for ever. Every other
    resource (SM share, tenants) as binding_resource counts it."""
    after = used.plus(demand)
    gpu_asleep, _, host_asleep, _ = after.asleep(capacity)
    f = capacity.active_fraction
    gpu = after.gpu_memory_bytes - gpu_asleep + math.ceil(f * gpu_asleep)
    host = after.host_memory_bytes - host_asleep + math.ceil(f * host_asleep)
    return (
        (demand.gpu_memory_bytes == 0
         or gpu_bytes_needed(max(gpu, demand.gpu_memory_bytes)) <= capacity.gpu_memory_bytes)
        and (demand.sm_percent == 0 or after.sm_percent <= capacity.sm_percent)
        and max(host, demand.host_memory_bytes) <= capacity.host_memory_bytes
        and after.tenants <= capacity.max_tenants
    )  # fmt: skip


def is_subset(desired: Any, live: Any) -> bool:
    """True when every field we set already has our value (server defaults may add more)."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(is_subset(v, live.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(desired) == len(live)
            and all(is_subset(d, x) for d, x in zip(desired, live, strict=True))
        )
    return bool(desired == live)


def is_older(body: Mapping[str, Any], known: Mapping[str, Any] | None) -> bool:
    """True when `body` is an older version than `known` (say, an event trailing our own write)."""
    if known is None or known["metadata"].get("uid") != body["metadata"].get("uid"):
        return False
    new, old = body["metadata"].get("resourceVersion", ""), known["metadata"].get("resourceVersion", "")
    # resourceVersions are opaque; etcd's are integers, and only then do we compare them.
    return bool(new.isdigit() and old.isdigit() and int(new) < int(old))


def unchanged(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> bool:
    """Our metadata and spec are already live (list items carry no apiVersion/kind to compare)."""
    return live is not None and all(is_subset(desired.get(k), live.get(k)) for k in ("metadata", "spec"))


class Reconciler:
    """One per operator process; all methods run on the operator's event loop."""

    def __init__(
        self,
        settings: OperatorSettings,
        api: KubeApi,
        mover: MoveStrategy | None = None,
        clock: Callable[[], str] = now_rfc3339,
    ) -> None:
        self.settings = settings
        self.api = api
        self.clock = clock
        self.snapshots: dict[str, JSON] = {}
        self.mover: MoveStrategy = mover or SnapshotMove(
            api, self.snapshots, clock, settings.move_snapshot_timeout_s
        )
        self.ledger = Ledger(settings.shard_capacity, 0)
        self.tenants: dict[str, JSON] = {}
        self.services: dict[str, JSON] = {}
        self.secrets: dict[str, JSON] = {}
        self.pending: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._backoff: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}  # Periodic snapshots
        # One pending "reconcile again" per Tenant (a move in flight, a failure's backoff): every
        # watch event during a move would otherwise start one more periodic chain.
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._periodic: dict[str, str] = {}  # tenant -> when this process last created one
        self._deleted: set[str] = set()  # Snapshots deleted by retention, until their DELETED event
        # Tenant -> the resourceVersion a reconcile last converged on: the watch echoes our own
        # writes (finalizer, status) back, and reconciling a version we produced changes nothing.
        self._settled: dict[str, str] = {}
        self.roll = ShardRoll(api, settings.namespace, settings.shard_name, self._placements, self._moving,
                              self._place_away)  # fmt: skip
        self._roll_lock = asyncio.Lock()
        self._roll_timer: asyncio.TimerHandle | None = None  # the one scheduled roll tick
        self._roll_task: asyncio.Task[None] | None = None
        # Tenant -> the status.phase last seen, whoever wrote it (we or the shard): an Event per change.
        self._phases: dict[str, str] = {}
        self._invalid: set[str] = set()  # Tenants whose spec does not parse, as last reconciled
        self._over_model: dict[int, int] = {}  # shard -> tenants placed past the model, not yet said

    # -- start-up ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Ensure the shard set exists, then learn every placement before any handler runs."""
        replicas = await self.ensure_shards()
        self.ledger = Ledger(self.settings.shard_capacity, replicas)
        ns = self.settings.namespace
        for svc in await self.api.list(resource_path("v1", "services", ns), SELECTOR):
            self.services[svc["metadata"]["name"]] = svc
        for sec in await self.api.list(resource_path("v1", "secrets", ns), SELECTOR):
            self.secrets[sec["metadata"]["name"]] = sec
        for snap in await self.api.list(resource_path(*SNAPSHOTS, ns)):
            self.snapshots[snap["metadata"]["name"]] = snap
        bodies = await self.api.list(resource_path(*TENANTS, ns))
        bodies.sort(key=lambda b: (b["metadata"].get("creationTimestamp", ""), b["metadata"]["name"]))
        for body in bodies:
            self.tenants[body["metadata"]["name"]] = body
            self._phases[body["metadata"]["name"]] = phase_of(body)  # a restart posts no Events
            tenant = parse_tenant(body)
            if tenant.spec is None:
                self._invalid.add(tenant.name)
            ordinal = shard_ordinal(self.settings.shard_name, tenant.shard)
            if not tenant.deleting and ordinal is not None and ordinal < replicas:
                # An invalid spec keeps its shard across a restart too (see _reconcile).
                demand = tenant_demand(tenant.spec) if tenant.spec is not None else INVALID_DEMAND
                self.ledger.assign(tenant.name, ordinal, demand)
        log.info(
            "Started namespace=%s shards=%d tenants=%d placed=%d",
            ns,
            replicas,
            len(bodies),
            len(self.ledger.tenants()),
        )
        await self.roll_tick()  # resume a roll a previous process began (its state is on the StatefulSet)

    async def ensure_shards(self) -> int:
        """Apply the shard StatefulSet and headless Service when they differ; return the replicas."""
        s = self.settings
        path = resource_path("apps/v1", "statefulsets", s.namespace, s.shard_name)
        live = await self.api.get(path)
        replicas = int((live or {}).get("spec", {}).get("replicas", s.shards)) if live else s.shards
        owner = await self._owner()
        desired = build_shard_statefulset(s, replicas, owner)
        if not unchanged(desired, live):
            await self.api.apply(desired)
            log.info("Applied StatefulSet %s/%s replicas=%d", s.namespace, s.shard_name, replicas)
        service = build_shard_service(s, owner)
        live_svc = await self.api.get(resource_path("v1", "services", s.namespace, s.shard_name))
        if not unchanged(service, live_svc):
            await self.api.apply(service)
            log.info("Applied Service %s/%s (headless, shards)", s.namespace, s.shard_name)
        return replicas

    async def _owner(self) -> dict[str, Any] | None:
        """The owner reference of the operator's own Deployment, when the chart names it."""
        name = self.settings.owner_deployment
        if not name:
            return None
        deployment = await self.api.get(
            resource_path("apps/v1", "deployments", self.settings.namespace, name)
        )
        if deployment is None:
            log.warning("Found no Deployment %s to own the shard set; it will outlive the release", name)
            return None
        return build_owner_reference(deployment)

    # -- watch events --------------------------------------------------------------------------
    def observe_owned(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        cache = self.services if kind == "Service" else self.secrets
        name = body["metadata"]["name"]
        if event_type == "DELETED":
            cache.pop(name, None)
            tenant = body["metadata"].get("labels", {}).get(LABEL_TENANT)
            if tenant in self.tenants:  # someone deleted what we own: put it back
                self.spawn(tenant)
        else:
            cache[name] = dict(body)

    async def on_tenant(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        name = body["metadata"]["name"]
        if event_type == "DELETED":
            self.forget(name)
            return
        version = body["metadata"].get("resourceVersion")
        if version is not None and version == self._settled.get(name):
            return
        if not is_older(body, self.tenants.get(name)):
            self.tenants[name] = dict(body)
            await self._phase_changed(body)  # a shard's status write moves the phase too
        await self.reconcile(name)

    async def on_snapshot(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        name, tenant = body["metadata"]["name"], tenant_of(body)
        old = self.snapshots.get(name)
        if event_type == "DELETED":
            self.snapshots.pop(name, None)
            self._deleted.discard(name)
        elif not is_older(body, old):
            self.snapshots[name] = dict(body)
        if tenant in self.tenants:
            if old is None or event_type == "DELETED" or phase_of(old) != phase_of(body):
                self.spawn(tenant)  # a move may proceed; lastSnapshot and retention may change
        elif event_type != "DELETED" and not phase_of(body) and not is_deleting(body):
            await self._fail_orphan(body)

    async def _fail_orphan(self, body: Mapping[str, Any]) -> None:
        """A Snapshot naming no Tenant: say so (a Tenant created a moment ago is looked up first)."""
        meta, tenant = body["metadata"], tenant_of(body)
        ns = meta.get("namespace") or self.settings.namespace
        try:
            if await self.api.get(resource_path(*TENANTS, ns, tenant)) is not None:
                return
            status = tenant_not_found_status(tenant, int(meta.get("generation") or 0), self.clock())
            await self.api.merge_patch(
                resource_path(*SNAPSHOTS, ns, meta["name"], "status"), {"status": status}
            )
            log.info("Failed Snapshot %s/%s: Tenant %s not found", ns, meta["name"], tenant)
        except TRANSIENT as exc:
            log.warning("Failed marking Snapshot %s (Tenant %s not found): %s", meta["name"], tenant, exc)

    async def on_statefulset(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        if body["metadata"]["name"] != self.settings.shard_name:
            return
        if event_type == "DELETED":
            await self.ensure_shards()
            return
        replicas = int(body.get("spec", {}).get("replicas", 0))
        if replicas != self.ledger.shards:
            await self.resize(replicas)
        await self.roll_tick()  # a new revision, a pod's readiness: the roll's next step may be due

    # -- shard roll (roll.py) --------------------------------------------------------------------
    async def roll_tick(self) -> None:
        """One step of the operator's shard roll; while one is under way, again every retry period."""
        if self._roll_lock.locked():
            return
        async with self._roll_lock:
            try:
                step = await self.roll.tick()
            except TRANSIENT as exc:
                log.warning("Failed a shard roll step, retrying: %s", exc)
                step = "retry"
            except Exception:  # a bug must not end the roll's ticks silently in a forgotten task
                log.exception("Failed a shard roll step (unexpected), retrying")
                step = "retry"
            await self._say_over_model("shard roll")
        if self._roll_timer is not None:  # this tick ran: a pending one is not needed any more
            self._roll_timer.cancel()
            self._roll_timer = None
        if step not in ("none", "done"):
            log.debug("Shard roll step=%s", step)
            self._roll_timer = asyncio.get_running_loop().call_later(
                self.settings.reconcile_retry_s, self._roll_again
            )

    def _roll_again(self) -> None:
        self._roll_timer = None
        self._roll_task = asyncio.get_running_loop().create_task(self.roll_tick())

    def _placements(self) -> dict[str, str | None]:
        """status.shard of each tenant the ledger holds and the roll may move (one being deleted is
        released). One whose spec is invalid is left out: no shard would load it, so it cannot move
        (_keep_invalid puts it back each time, and the drain would wait for ever); it stays placed
        on its shard through the pod's replacement (same name), asleep with its state in the store."""
        held = self.ledger.tenants()
        return {
            n: (b.get("status") or {}).get("shard")
            for n, b in self.tenants.items()
            if n in held and n not in self._invalid
        }

    def _moving(self) -> dict[str, Mapping[str, Any]]:
        """status.move of each tenant moving, and a {source, target} for each the ledger has already
        put on another shard whose reconcile has not written status.move yet."""
        moves: dict[str, Mapping[str, Any]] = {}
        for name, body in self.tenants.items():
            status = body.get("status") or {}
            move, placed = status.get("move"), self.ledger.shard_of(name)
            if isinstance(move, Mapping) and move:
                moves[name] = move
            elif status.get("shard") and placed is not None:
                target = shard_pod_name(self.settings.shard_name, placed)
                if target != status["shard"]:
                    moves[name] = {"source": status["shard"], "target": target}
        return moves

    def _place_away(self, name: str, source: int, tiers: Sequence[Sequence[int]]) -> int | None:
        """Move `name` off shard `source` to the first tier's shard (rendezvous order) with room.

        Room is the ledger's usage, which counts the tenants still served by a shard they are
        moving away from (or waiting to) on that shard too: a move's target holds the tenant while
        its source still does. Returns the shard, or None when none has room."""
        demand, current = self.ledger.demand_of(name), self.ledger.shard_of(name)
        if demand is None or current is None:
            return None
        if current != source:
            return current  # already leaving (a move in flight)
        capacity = self.ledger.capacity
        for tier in tiers:
            for ordinal in ranked(name, self.ledger.shards):
                if ordinal not in tier or ordinal == source:
                    continue
                if binding_resource(capacity, self.ledger.usage(ordinal), demand) is None:
                    self.ledger.assign(name, ordinal, demand)
                    self.spawn(name)
                    return ordinal
        # None has room by the current model: a roll moves what was already admitted, so the shards
        # filled under the mean model (before 52c3b4f) may hand their tenants on by it (an empty
        # surge or replaced shard takes a whole shard's), said in a Warning Event; new placements
        # still follow the current model.
        for tier in tiers:
            for ordinal in ranked(name, self.ledger.shards):
                if ordinal not in tier or ordinal == source:
                    continue
                if fits_as_admitted(capacity, self.ledger.usage(ordinal), demand):
                    self.ledger.assign(name, ordinal, demand)
                    self._over_model[ordinal] = self._over_model.get(ordinal, 0) + 1
                    self.spawn(name)
                    return ordinal
        return None

    async def _say_over_model(self, why: str) -> None:
        """One Warning Event on the shard StatefulSet per shard that took tenants past the current
        admission model since the last call (a roll's drain, a scale-in)."""
        over, self._over_model = self._over_model, {}
        if not over:
            return
        s = self.settings
        sts = await self.api.get(resource_path("apps/v1", "statefulsets", s.namespace, s.shard_name))
        involved = {**(sts or {"metadata": {"name": s.shard_name, "namespace": s.namespace}}),
                    "apiVersion": "apps/v1", "kind": "StatefulSet"}  # fmt: skip
        for ordinal, count in sorted(over.items()):
            message = (
                f"{why}: shard {shard_pod_name(s.shard_name, ordinal)} took {count} tenant(s) past the "
                "current admission model (sleepers by the binomial tail), within the mean model they "
                "were admitted by; new tenants go there only once it is back within the current model"
            )
            log.warning("Placed past the admission model StatefulSet %s/%s: %s", s.namespace, s.shard_name,
                        message)  # fmt: skip
            await self.api.post_event(involved, "Warning", OVER_MODEL, message, "tensorwasm-operator")

    # -- shard set changes ---------------------------------------------------------------------
    async def resize(self, replicas: int) -> None:
        old = self.ledger.shards
        demands = {n: self.ledger.demand_of(n) for n, s in self.ledger.tenants().items() if s >= replicas}
        moves = self.ledger.resize(replicas)
        moves = [self._place_homeless(m, demands.get(m.tenant)) for m in moves]
        moved = [m for m in moves if m.target is not None]
        log.info(
            "Resized shards from=%d to=%d moved=%d unplaced=%d",
            old,
            replicas,
            len(moved),
            len(moves) - len(moved),
        )
        for move in moves:
            if move.target is None:
                self.pending.add(move.tenant)
            self.spawn(move.tenant)
        self.wake_pending()
        await self._say_over_model("scale-in")

    def _place_homeless(self, move: Move, demand: TenantDemand | None) -> Move:
        """A tenant of a shard scaled in that no shard has room for by the current model (the
        roll's surge shard handing back a pre-52c3b4f shard's tenants): placed by the mean model it
        was admitted by (fits_as_admitted), rather than unplaced with its state."""
        if move.target is not None or demand is None:
            return move
        for ordinal in ranked(move.tenant, self.ledger.shards):
            if fits_as_admitted(self.ledger.capacity, self.ledger.usage(ordinal), demand):
                self.ledger.assign(move.tenant, ordinal, demand)
                self._over_model[ordinal] = self._over_model.get(ordinal, 0) + 1
                return Move(move.tenant, move.source, ordinal)
        return move

    # -- reconcile -----------------------------------------------------------------------------
    def spawn(self, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self.reconcile(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def wake_pending(self) -> None:
        for name in sorted(self.pending):
            self.spawn(name)

    def forget(self, name: str) -> None:
        self.tenants.pop(name, None)
        self._invalid.discard(name)
        self._phases.pop(name, None)
        self._settled.pop(name, None)
        for timers in (self._timers, self._retries):
            timer = timers.pop(name, None)
            if timer is not None:
                timer.cancel()
        self.pending.discard(name)
        self.mover.forget(name)
        if self.ledger.release(name) is not None:
            self.wake_pending()

    async def reconcile(self, name: str) -> None:
        health.QUEUE.inc()  # waiting for the Tenant's lock or running
        try:
            await self._reconcile_locked(name)
        finally:
            health.QUEUE.dec()

    async def _reconcile_locked(self, name: str) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            body = self.tenants.get(name)
            if body is None:
                return
            writes: Counter[str] = Counter()
            task_writes.set(writes)  # this task's own writes, not those of concurrent reconciles
            try:
                with health.reconcile_timer() as result:
                    try:
                        phase = await self._reconcile(body)
                    except BaseException:
                        result[0] = "error"
                        raise
            except TRANSIENT as exc:
                if isinstance(exc, KubeError) and exc.status == 404:
                    return  # the Tenant is gone; the DELETED event cleans up
                delay = min(self._backoff.get(name, self.settings.reconcile_retry_s / 2) * 2, MAX_BACKOFF_S)
                self._backoff[name] = delay
                log.warning("Failed to reconcile Tenant %s, retrying in %.0fs: %s", name, delay, exc)
                self._retry_later(name, delay)
                return
            self._backoff.pop(name, None)
            final = self.tenants.get(name)
            if final is not None and phase != "Deleting":
                self._settled[name] = str(final["metadata"].get("resourceVersion"))
            level = logging.INFO if writes else logging.DEBUG
            log.log(level, "Reconciled Tenant %s/%s phase=%s writes=%d", body["metadata"].get("namespace"),
                    name, phase, sum(writes.values()))  # fmt: skip

    async def _reconcile(self, body: JSON) -> str:
        tenant = parse_tenant(body)
        path = resource_path(*TENANTS, tenant.namespace, tenant.name)
        if tenant.deleting:
            if FINALIZER in tenant.finalizers:
                self.forget(tenant.name)
                self.tenants[tenant.name] = body  # keep it until the DELETED event arrives
                await self._set_finalizers(path, body, [f for f in tenant.finalizers if f != FINALIZER])
                log.info("Released Tenant %s/%s from its shard", tenant.namespace, tenant.name)
            return "Deleting"
        if FINALIZER not in tenant.finalizers:
            body = await self._set_finalizers(path, body, [*tenant.finalizers, FINALIZER])
            self.tenants[tenant.name] = body
            tenant = parse_tenant(body)

        token_secret: str | None = None
        move: Mapping[str, Any] | None = None
        pending_target: str | None = None
        if tenant.spec is None:
            self._invalid.add(tenant.name)
            placement = await self._keep_invalid(tenant)
        else:
            self._invalid.discard(tenant.name)
            placement, move, service_shard, pending_target = await self._place(tenant)
            token_secret = await self._ensure_secret(tenant)
            if service_shard is not None:
                await self._ensure_service(tenant, service_shard)
                await self._snapshot_housekeeping(tenant)

        desired = desired_status(
            tenant, placement, tenant_endpoint(tenant, self.settings), token_secret, self.clock()
        )
        desired["move"] = move
        # Said in status so kubectl users (and the scaling e2e) see a move that is yet to begin.
        desired["pendingMove"] = {"target": pending_target} if pending_target else None
        desired["lastSnapshot"] = last_snapshot(tenant.name, self.snapshots.values())
        patch = status_patch(tenant.status, desired)
        if patch:
            updated = await self.api.merge_patch(path + "/status", {"status": patch})
            if updated:
                self.tenants[tenant.name] = updated
                await self._phase_changed(updated)
        return str(desired["phase"])

    async def _keep_invalid(self, tenant: Tenant) -> Placement:
        """A placed tenant whose spec became invalid keeps its shard (and its room there): that
        shard refuses the spec too and puts the tenant to sleep, keeping its state for the fixed
        spec. Unplacing it would look like a move to the shard, which keeps nothing. A move in
        flight rolls back (no target would load the spec): status.move is cleared, the source
        serves it again, then refuses it and sleeps it keeping state; a move still waiting for
        its target pod is dropped. Either way the ledger follows status.shard, the source."""
        name = tenant.name
        self.pending.discard(name)
        step = await self.mover.abandon(tenant, "its spec became invalid", self._runs)
        shard = step.shard if step is not None else tenant.shard
        ordinal = shard_ordinal(self.settings.shard_name, shard)
        if ordinal is None or ordinal >= self.ledger.shards:
            if self.ledger.release(name) is not None:
                self.wake_pending()
            return Placement(None)
        demand = self.ledger.demand_of(name) or INVALID_DEMAND
        if self.ledger.shard_of(name) != ordinal or self.ledger.serving(name) != ordinal:
            self.ledger.assign(name, ordinal, demand)
            self.ledger.serve(name, ordinal)
            self.wake_pending()  # the room it held on a move's target is free again
        if step is not None and step.event is not None:
            await self._post_tenant_event(name, step.event)
        return Placement(shard)

    async def _post_tenant_event(self, name: str, event: tuple[str, str]) -> None:
        involved = {**self.tenants.get(name, {}), "apiVersion": API_VERSION, "kind": TENANT.kind}
        await self.api.post_event(involved, "Warning", *event, "tensorwasm-operator")

    async def _set_finalizers(self, path: str, body: JSON, finalizers: list[str]) -> JSON:
        # resourceVersion makes this a compare-and-swap: a concurrent edit gives 409 and a retry.
        patch = {
            "metadata": {"finalizers": finalizers, "resourceVersion": body["metadata"]["resourceVersion"]}
        }
        return await self.api.merge_patch(path, patch)

    async def _snapshot_housekeeping(self, tenant: Tenant) -> None:
        """Retention (keep the newest `retain` Ready Snapshots) and the Periodic policy's Snapshots."""
        assert tenant.spec is not None
        spec, ns = tenant.spec, tenant.namespace
        for victim in retention_victims(tenant.name, self.snapshots.values(), spec.snapshot.retain,
                                        spec.restore_from):  # fmt: skip
            if victim not in self._deleted:
                self._deleted.add(victim)
                await self.api.delete(resource_path(*SNAPSHOTS, ns, victim))
                log.info("Deleted Snapshot %s/%s (retain=%d)", ns, victim, spec.snapshot.retain)
        if spec.snapshot.policy != "Periodic" or not spec.snapshot.interval_s:
            return
        now = self.clock()
        known = list(self.snapshots.values())
        if tenant.name in self._periodic:  # created by us, maybe not yet seen by the watch
            known.append({"spec": {"tenant": tenant.name},
                          "metadata": {"creationTimestamp": self._periodic[tenant.name]}})  # fmt: skip
        since = str(self.tenants.get(tenant.name, {}).get("metadata", {}).get("creationTimestamp") or now)
        wait = periodic_wait_s(tenant.name, known, spec.snapshot.interval_s, since, now)
        if wait <= 0:
            name = snapshot_name(tenant.name, PERIODIC, short_id(tenant.uid, now))
            await self.api.create(resource_path(*SNAPSHOTS, ns), build_snapshot(tenant, name, PERIODIC))
            self._periodic[tenant.name] = now
            log.info("Created Snapshot %s/%s (Periodic every %ds)", ns, name, spec.snapshot.interval_s)
            wait = spec.snapshot.interval_s
        timer = self._timers.pop(tenant.name, None)
        if timer is not None:
            timer.cancel()
        self._timers[tenant.name] = asyncio.get_running_loop().call_later(wait + 1, self.spawn, tenant.name)

    async def _place(
        self, tenant: Tenant
    ) -> tuple[Placement, Mapping[str, Any] | None, str | None, str | None]:
        """(placement, status.move, the shard pod the tenant's Service selects now, the shard pod a
        move waits for to be Ready)."""
        assert tenant.spec is not None  # the caller placed only valid specs
        name, demand = tenant.name, tenant_demand(tenant.spec)
        shard_name = self.settings.shard_name
        current = self.ledger.shard_of(name)
        if current is None:
            ordinal = shard_ordinal(shard_name, tenant.shard)
            if ordinal is not None and ordinal < self.ledger.shards:
                self.ledger.assign(name, ordinal, demand)  # sticky: adopt what status says
                current = ordinal
        if current is None:
            preferred = tenant.spec.placement.preferred_shard if tenant.spec else None
            decision = self.ledger.place(name, demand, preferred)
            if decision.shard is None:
                self.pending.add(name)
                reason = NO_SHARDS if decision.resource == "shards" else INSUFFICIENT_CAPACITY
                return Placement(None, reason, decision.message), None, None, None
            current = decision.shard
        elif self.ledger.demand_of(name) != demand:
            # Sticky even when a grown demand overfills the shard: moving is the snapshot issue's call.
            self.ledger.assign(name, current, demand)
        self.pending.discard(name)
        current = self._place_again(name, current, demand)
        target = shard_pod_name(shard_name, current)
        step = await self.mover.step(tenant, target, self._runs)
        # Rolled back, or its target pod never got Ready (not a move still waiting for it): the
        # ledger follows status.shard.
        if step.record is None and not step.pending and step.shard != target:
            back = shard_ordinal(shard_name, step.shard)
            if back is not None and back < self.ledger.shards:
                self.ledger.assign(name, back, demand)
            else:  # not a shard of the set (never written by us): leave the ledger's choice
                log.warning("Found Tenant %s back on %r, not a shard of the set; keeping shard %s",
                            name, step.shard, target)  # fmt: skip
        # The shard its Service selects still serves it (waiting, Holding, Restoring): the ledger
        # counts it there too, so new tenants cannot take the room it still uses.
        self.ledger.serve(name, shard_ordinal(shard_name, step.service))
        if step.event is not None:
            await self._post_tenant_event(name, step.event)
        if step.waiting:  # ask again soon; a Snapshot or a shard's report wakes us sooner
            self._retry_later(name, self.settings.reconcile_retry_s)
        pending = step.retry or (target if step.pending else None)
        return Placement(step.shard), step.record, step.service, pending

    def _place_again(self, name: str, current: int, demand: TenantDemand) -> int:
        """Place `name` on the shard its move gave up waiting for, once the back-off is over and
        that shard still has room for it (else it stays on `current`); the shard it is placed on."""
        if self.ledger.serving(name) != current:
            return current  # placed away from its shard since (the roll, a resize): that stands
        retry = self.mover.retry_due(name)
        ordinal = shard_ordinal(self.settings.shard_name, retry) if retry else None
        if ordinal is None or ordinal >= self.ledger.shards or ordinal == current:
            return current
        lacking = binding_resource(self.ledger.capacity, self.ledger.usage(ordinal), demand)
        if lacking is not None:
            log.info("Kept Tenant %s on shard %d: shard %d it waited for has no room now (%s)",
                     name, current, ordinal, lacking)  # fmt: skip
            return current
        self.ledger.assign(name, ordinal, demand)
        log.info("Placed Tenant %s on shard %d again after its back-off", name, ordinal)
        return ordinal

    def _retry_later(self, name: str, delay: float) -> None:
        """Reconcile `name` again in `delay` s; replaces the one pending before (one per Tenant)."""
        timer = self._retries.pop(name, None)
        if timer is not None:
            timer.cancel()
        self._retries[name] = asyncio.get_running_loop().call_later(delay, self._retry_now, name)

    def _retry_now(self, name: str) -> None:
        self._retries.pop(name, None)
        self.spawn(name)

    def _runs(self, shard: str) -> bool:
        ordinal = shard_ordinal(self.settings.shard_name, shard)
        return ordinal is not None and ordinal < self.ledger.shards

    async def _ensure_secret(self, tenant: Tenant) -> str:
        name = tenant.token_secret
        if name in self.secrets:
            return name
        path = resource_path("v1", "secrets", tenant.namespace)
        # A user-named Secret may exist without our labels (so not in the cache): read it.
        user_named = tenant.spec is not None and tenant.spec.auth_secret_name
        if user_named and await self.api.get(f"{path}/{name}") is not None:
            return name
        tokens = secrets.token_urlsafe(32), secrets.token_urlsafe(32)  # invoke, read-only (issue 14)
        created = await self.api.create(path, build_token_secret(tenant, *tokens))
        if created is not None:
            self.secrets[name] = created
        return name

    async def _ensure_service(self, tenant: Tenant, shard_pod: str) -> None:
        desired = build_tenant_service(tenant, shard_pod, self.settings)
        name = tenant_service_name(tenant.name)
        live = self.services.get(name)
        if unchanged(desired, live):
            return
        if live is None:  # a plain create costs the API server less than a server-side apply
            created = await self.api.create(resource_path("v1", "services", tenant.namespace), desired)
            if created is not None:
                self.services[name] = created
                return
        self.services[name] = await self.api.apply(desired)

    async def _phase_changed(self, body: Mapping[str, Any]) -> None:
        """Post an Event when status.phase differs from the last phase seen (ours or a shard's write).

        Watch echoes of a write already seen carry the same phase, so each transition posts once.
        """
        name, phase = body["metadata"]["name"], phase_of(body)
        old = self._phases.get(name)
        self._phases[name] = phase
        if not phase or phase == old or is_deleting(body) or {old, phase} == QUIET_FLIPS:
            return
        status = body.get("status") or {}
        conditions = status.get("conditions") or []
        ready: Mapping[str, Any] = next((c for c in conditions if c.get("type") == "Ready"), {})
        reason = str(ready.get("reason") or phase)
        message = (
            f"{old or 'New'} -> {phase} on shard {status.get('shard') or '-'}: {ready.get('message', '')}"
        )
        kind = "Warning" if phase in WARNING_PHASES else "Normal"
        involved = {**body, "apiVersion": API_VERSION, "kind": TENANT.kind}  # list items carry neither
        await self.api.post_event(involved, kind, reason, message, "tensorwasm-operator")
        health.EVENTS.labels(kind).inc()
        log.info("Posted Event Tenant %s/%s %s reason=%s phase=%s", body["metadata"].get("namespace"),
                 name, kind, reason, phase)  # fmt: skip

    async def drain(self) -> None:
        """Wait for spawned reconciles (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
