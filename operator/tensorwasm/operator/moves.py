"""Moving a tenant between two running shards without a lost request or a lost write.

Owns the `MoveStrategy` seam the reconciler asks on every reconcile of a placed tenant, the move
protocol's phases (kept in the Tenant's `status.move`, so a restarted operator resumes the same
move), and its two strategies:
- `DirectMove`: re-point at once (tests and tools that play no shards);
- `SnapshotMove` (the operator's): the barrier protocol below.

The protocol, from source S to target T (docs/operator.md, "Moves"):
0. Nothing happens until T's pod is Ready (the ledger has already placed the tenant on T; the
   reconciler says so in status.pendingMove): S serves the tenant as before, and the hold below
   starts only when T can take the tenant, so clients are not told "moving" while T's pod starts.
   A source leaving the shard set does not wait. The wait is bounded by the move's deadline (below):
   a pod that is still not Ready then (no GPU node free, its image not pulling) gives the tenant
   back to S in the ledger with a Warning Event (reason TargetNeverReady, naming the pod and what
   it says of itself), and the move is tried again after the back-off below (status.pendingMove
   names T meanwhile): the reconciler places the tenant on T again if T still has room for it.
1. `Holding` (snapshot policy OnMove only): status.move = {source S, target T, snapshot, phase,
   startedAt} and a Snapshot `<tenant>-move-<short>` (purpose move). S, seeing status.move on a
   Tenant it serves, stops admitting it (503 + Retry-After, kind tenant_moving), waits for its
   in-flight invokes, then captures that Snapshot: no write after the capture is ever accepted.
2. `Restoring` (once the Snapshot is Ready; other policies start here): status.shard = T while the
   tenant's Service still selects S, which keeps answering "moving" for the tenant it gave up.
   T loads the tenant, restores that Snapshot, and reports status.runtime {shard: T, loaded}.
3. Done: the Service selects T and status.move is cleared.
A move not done by its deadline (`move_deadline`: `timeout_s`, the capture and restore, plus the
tenant's timeoutMs, the longest its barrier waits for a running invoke or job; at most
`MOVE_DEADLINE_MAX_S`), or whose Snapshot Failed, rolls back: status.shard and the Service stay (or
go back) on S, status.move is cleared, an unfinished move Snapshot is deleted, S serves again
(restoring the newest Ready Snapshot if it had already let the tenant go), and a Warning Event
(reason MoveRolledBack) says why. A tenant whose move rolled back is not held again at once: a new
move of it (the roll placing it again, say) waits out a back-off (`backoff_s`: the move's deadline,
doubled for each rollback in a row, at most `MOVE_BACKOFF_MAX_S`) with the source serving it, says
so once in a Warning Event (reason MoveDeferred) and meanwhile counts as waiting (status.pendingMove).
A source that left the shard set (scaled in) runs the same protocol while its pod terminates: the
shard keeps serving until its tenants are handed off (sources/kube.py). With no pod left it gets
`GONE_SOURCE_WAIT_S` (10 s) to capture instead of the full timeout. Such a move that fails or times
out cannot roll back: it goes on to the target (newest Ready Snapshot) with a MovedWithoutCapture
Warning.
Must not import kopf; I/O only through the KubeApi it is given, never sleeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tensorwasm.api.group import API_VERSION, SNAPSHOT
from tensorwasm.api.snapshot import FAILED, READY, phase_of
from tensorwasm.api.stamps import parse_rfc3339
from tensorwasm.api.tenant import Tenant
from tensorwasm.kube.client import KubeApi, resource_path
from tensorwasm.operator.pods import pod_ready
from tensorwasm.operator.snapshots import MOVE, build_snapshot, short_id, snapshot_name

log = logging.getLogger("tensorwasm.operator")

ON_MOVE = "OnMove"
HOLDING, RESTORING = "Holding", "Restoring"
ROLLED_BACK, NOT_CAPTURED = "MoveRolledBack", "MovedWithoutCapture"
GONE_SOURCE_WAIT_S = 10.0  # a leaving source without a pod gets this long to capture
DEFERRED = "MoveDeferred"  # the Event's reason when a move waits out the back-off of a rollback
NEVER_READY = "TargetNeverReady"  # the Event's reason when a move gave up waiting for its target pod
POD_SAYS_MAX = 300  # characters of a pod's own words (a scheduler's message) quoted in an Event
# A source answers "moving" for a tenant that left it until its move is over, at most 3660 s
# (the runtime's MOVED_MAX_S): no move may last longer.
MOVE_DEADLINE_MAX_S = 3600.0
MOVE_BACKOFF_MAX_S = 3600.0  # the longest a rolled-back tenant waits before its next move
READY_CACHE_S = 0.5  # a target pod's readiness is read at most this often (tenants waiting share it)

JSON = dict[str, Any]


@dataclass(frozen=True)
class MoveStep:
    """Where the tenant is now: `shard` (status.shard), `service` (the pod its Service selects),
    `record` (status.move; None: no move in flight), `event` ((reason, message) of a Warning to
    post once), `pending` (placed elsewhere, but the move waits for its target pod to be Ready, or
    for a back-off: not a rollback), `retry` (the ledger takes the tenant back to `shard`, its
    target pod never got Ready; a move there is tried again after the back-off: `retry_due`),
    `waiting` (ask again soon)."""

    shard: str
    service: str
    record: Mapping[str, Any] | None = None
    event: tuple[str, str] | None = None
    pending: bool = False
    retry: str | None = None

    @property
    def waiting(self) -> bool:
        return self.record is not None or self.pending or self.retry is not None


def settled(shard: str) -> MoveStep:
    return MoveStep(shard, shard)


def move_deadline(tenant: Tenant, timeout_s: float) -> float:
    """Seconds a move of `tenant` may take from its start: `timeout_s` (MOVE_SNAPSHOT_TIMEOUT: the
    capture and the restore) plus the tenant's timeoutMs (the barrier waits for its running invokes
    and async jobs, each bounded by it), at most MOVE_DEADLINE_MAX_S."""
    timeout_ms = tenant.spec.limits.timeout_ms if tenant.spec is not None else 0
    return min(MOVE_DEADLINE_MAX_S, timeout_s + timeout_ms / 1000)


def backoff_s(deadline: float, rollbacks: int) -> float:
    """How long a tenant whose move rolled back `rollbacks` times in a row waits before the next:
    the move's own deadline (it was held that long; it serves at least as long before it is held
    again), doubled for each further rollback, at most MOVE_BACKOFF_MAX_S."""
    doublings: int = min(max(rollbacks - 1, 0), 16)
    return min(MOVE_BACKOFF_MAX_S, deadline * (1 << doublings))


def pod_says(name: str, pod: Mapping[str, Any] | None) -> str:
    """What a shard pod that is not Ready says of itself, for an Event: its phase and the first
    reason it gives (a container waiting on its image, an unschedulable pod, a failing probe);
    bounded (POD_SAYS_MAX): the words are the cluster's, not ours."""
    if pod is None:
        return f"pod {name}: no such pod"
    status = pod.get("status")
    status = status if isinstance(status, Mapping) else {}
    phase = str(status.get("phase") or "phase unknown")
    metadata = pod.get("metadata")
    if isinstance(metadata, Mapping) and metadata.get("deletionTimestamp"):
        phase += ", terminating"
    reasons: list[str] = []
    # The cluster's words, not ours: any entry may be null or not an object.
    for container in _entries(status.get("containerStatuses")):
        state = container.get("state")
        waiting = (state if isinstance(state, Mapping) else {}).get("waiting")
        if isinstance(waiting, Mapping) and waiting.get("reason"):
            reasons.append(f"{waiting['reason']}: {waiting.get('message') or ''}".rstrip(": "))
    for condition in _entries(status.get("conditions")):
        if condition.get("status") != "True" and condition.get("reason"):
            reasons.append(f"{condition['reason']}: {condition.get('message') or ''}".rstrip(": "))
    said = f"{phase}, {reasons[0]}" if reasons else phase
    if len(said) > POD_SAYS_MAX:
        said = said[: POD_SAYS_MAX - 3] + "..."
    return f"pod {name}: {said}"


def _entries(value: Any) -> list[Mapping[str, Any]]:
    """The objects of a list the cluster wrote; anything else (null, a string) is skipped."""
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


@dataclass
class Backoff:
    """A tenant's last rollback: when the next move may start (`until`, clock seconds), the
    rollbacks in a row, why the last one happened, whether the deferral was said (an Event), and
    `retry`: the target to place it on again once `until` passes (its pod never got Ready)."""

    until: float
    rollbacks: int
    why: str
    said: bool = False
    retry: str | None = None


class MoveStrategy(Protocol):
    async def step(self, tenant: Tenant, target: str, runs: Callable[[str], bool]) -> MoveStep:
        """The next step of the tenant's move towards `target` (the ledger's shard for it).

        `runs(shard)`: that shard pod is part of the current shard set."""
        ...

    def retry_due(self, tenant: str) -> str | None:
        """The shard pod to place `tenant` on again: its move gave up waiting for that pod to be
        Ready and the back-off since is over. Said once (the caller places it, or gives up)."""
        ...

    def forget(self, tenant: str) -> None:
        """The Tenant is gone: drop what the strategy remembers of it."""
        ...

    async def abandon(self, tenant: Tenant, why: str, runs: Callable[[str], bool]) -> MoveStep | None:
        """Stop the tenant's move (its spec became invalid: no target would load it): roll back to
        the source as a move past its deadline does; None when no move is in flight."""
        ...


class DirectMove:
    """Re-point at once; the target shard cold-starts the tenant."""

    async def step(self, tenant: Tenant, target: str, runs: Callable[[str], bool]) -> MoveStep:
        return settled(target)

    def retry_due(self, tenant: str) -> str | None:
        return None

    def forget(self, tenant: str) -> None:
        pass

    async def abandon(self, tenant: Tenant, why: str, runs: Callable[[str], bool]) -> MoveStep | None:
        return None


def move_record(tenant: Tenant) -> Mapping[str, Any] | None:
    """status.move when it names a move this protocol can resume (source, target and phase)."""
    move = tenant.status.get("move")
    if isinstance(move, Mapping) and move.get("source") and move.get("target") and move.get("phase"):
        return move
    return None


def target_reported(tenant: Tenant, target: str) -> bool:
    """The target shard reports the tenant loaded (its snapshot restore is part of the load)."""
    runtime = tenant.status.get("runtime")
    return isinstance(runtime, Mapping) and runtime.get("shard") == target and runtime.get("loaded") is True


class SnapshotMove:
    """The barrier protocol; `snapshots` is the operator's live cache of Snapshot objects."""

    def __init__(
        self,
        api: KubeApi,
        snapshots: Mapping[str, Mapping[str, Any]],
        clock: Callable[[], str],
        timeout_s: float,
    ) -> None:
        self.api, self.snapshots, self.clock, self.timeout_s = api, snapshots, clock, timeout_s
        # Created by this process and not yet seen in the cache (bounded: a name leaves once the
        # cache has it or its move gives up).
        self._created: set[str] = set()
        # Shard pod -> (monotonic time read, Ready then, what it says of itself): at most one GET
        # per pod per READY_CACHE_S however many tenants wait for it.
        self._ready: dict[str, tuple[float, bool, str]] = {}
        # Tenant -> (the target it waits for, since when: clock seconds); logged once per target.
        self._pending: dict[str, tuple[str, float]] = {}
        # Tenant -> its last rollback (bounded: an entry goes with a finished move, or
        # MOVE_BACKOFF_MAX_S after its back-off ended).
        self._backoff: dict[str, Backoff] = {}

    def waiting_for_targets(self) -> dict[str, str]:
        """Tenant -> the shard pod its move waits for (placed there; nothing held until it is Ready)."""
        return {name: target for name, (target, _) in self._pending.items()}

    def forget(self, tenant: str) -> None:
        self._pending.pop(tenant, None)
        self._backoff.pop(tenant, None)

    async def abandon(self, tenant: Tenant, why: str, runs: Callable[[str], bool]) -> MoveStep | None:
        self._pending.pop(tenant.name, None)  # a move waiting for its target pod: nothing held yet
        move = move_record(tenant)
        if move is None:
            return None
        return await self._give_up(tenant, move, str(move["target"]), why, not runs(str(move["source"])))

    def backing_off(self) -> dict[str, float]:
        """Tenant -> seconds (by the clock) before a new move of it may start, after a rollback."""
        now = self._now()
        return {n: b.until - now for n, b in self._backoff.items() if b.until > now}

    async def step(self, tenant: Tenant, target: str, runs: Callable[[str], bool]) -> MoveStep:
        move = move_record(tenant)
        if move is None:
            source = tenant.shard
            if source is None or source == target:
                self._pending.pop(tenant.name, None)
                return self._retrying(tenant.name, target, runs)
            last = self._backoff.get(tenant.name)
            if last is not None and last.retry not in (None, target):
                last.retry = None  # placed elsewhere since it gave up waiting: that placement stands
            deferred = self._deferred(tenant, source, target) if runs(source) else None
            if deferred is not None:
                return deferred
            if runs(source) and not await self._target_ready(tenant, target):
                return self._wait_for_target(tenant, source, target)
            self._pending.pop(tenant.name, None)
            return await self._begin(tenant, source, target)
        source, to, phase = str(move["source"]), str(move["target"]), str(move["phase"])
        leaving = not runs(source)  # scaled in: its pod hands its tenants off while it terminates
        if target == source:  # the shard set changed back: the tenant stays where it was
            why = "the shard set changed back before the move finished"
            return await self._give_up(tenant, move, target, why, leaving)
        if not runs(to):
            if phase == HOLDING or leaving:
                move, to = {**move, "target": target}, target  # the same capture serves the new target
            else:
                return await self._give_up(
                    tenant, move, target, f"target shard {to} left the shard set", leaving
                )
        if phase == HOLDING and to != target:
            move, to = {**move, "target": target}, target
        waited, deadline = self._waited(move), move_deadline(tenant, self.timeout_s)
        if phase == HOLDING:
            limit = deadline
            if leaving and not await self._alive(tenant, source):
                # No pod object: most likely nobody captures (a crash, a hand-off past its bound);
                # a process may still run where pods are not real processes (a local stack).
                limit = min(limit, GONE_SOURCE_WAIT_S)
            return await self._holding(tenant, move, source, to, waited, leaving, limit)
        if target_reported(tenant, to):
            log.info("Moved Tenant %s from=%s to=%s after %.0fs", tenant.name, source, to, waited)
            self._backoff.pop(tenant.name, None)
            return settled(to)
        if waited >= deadline:
            why = f"shard {to} did not report the tenant loaded in {waited:.0f}s"
            return await self._give_up(tenant, move, to, why, leaving)
        return MoveStep(to, source, move)

    def retry_due(self, tenant: str) -> str | None:
        last = self._backoff.get(tenant)
        if last is None or last.retry is None or self._now() < last.until:
            return None
        target, last.retry = last.retry, None
        return target

    def _retrying(self, name: str, shard: str, runs: Callable[[str], bool]) -> MoveStep:
        """Settled on `shard`, unless a move from it gave up waiting for its target pod: then it
        waits out the back-off with `shard` serving (status.pendingMove names the target)."""
        last = self._backoff.get(name)
        if last is None or last.retry is None:
            return settled(shard)
        if not runs(last.retry) or last.retry == shard:  # the target left the set: nothing to retry
            last.retry = None
            return settled(shard)
        return MoveStep(shard, shard, retry=last.retry)

    def _wait_for_target(self, tenant: Tenant, source: str, target: str) -> MoveStep:
        """The source serves while `target`'s pod is not Ready, at most the move's deadline; then
        the tenant goes back to the source (in the ledger) with a Warning, and the move is tried
        again after the back-off."""
        now = self._now()
        since = self._pending.get(tenant.name)
        if since is None or since[0] != target:
            since = self._pending[tenant.name] = (target, now)
            log.info("Waiting for shard %s Ready before moving Tenant %s from=%s",
                     target, tenant.name, source)  # fmt: skip
        waited, deadline = now - since[1], move_deadline(tenant, self.timeout_s)
        if waited < deadline:
            return MoveStep(source, source, pending=True)
        del self._pending[tenant.name]
        says = self._ready.get(target, (0.0, False, f"pod {target}"))[2]
        why = f"shard {target} not Ready after {waited:.0f}s ({says})"
        wait = self._back_off(tenant, why, now, retry=target)
        message = (
            f"move from {source} to {target} gave up waiting: {why}; {source} serves it and is its"
            f" placement again; the move is tried again in {wait:.0f}s"
        )
        log.warning("Gave up moving Tenant %s: %s", tenant.name, message)
        return MoveStep(source, source, event=(NEVER_READY, message), retry=target)

    def _back_off(self, tenant: Tenant, why: str, now: float, retry: str | None = None) -> float:
        """Start the tenant's back-off after a failed move (one more in a row); its length in s."""
        last = self._backoffs(now).get(tenant.name)
        rollbacks = (last.rollbacks if last is not None else 0) + 1
        wait = backoff_s(move_deadline(tenant, self.timeout_s), rollbacks)
        self._backoff[tenant.name] = Backoff(now + wait, rollbacks, why, retry=retry)
        return wait

    def _deferred(self, tenant: Tenant, source: str, target: str) -> MoveStep | None:
        """A move of a tenant whose last move rolled back waits out its back-off: the source serves it
        (nothing held), the ledger keeps it on `target`, and a Warning Event says why, once."""
        now = self._now()
        last = self._backoffs(now).get(tenant.name)
        if last is None or now >= last.until:
            return None
        event = None
        if not last.said:
            last.said = True
            message = (
                f"move from {source} to {target} waits {last.until - now:.0f}s more: its last move "
                f"rolled back ({last.why}); {source} serves it meanwhile"
            )
            log.warning("Deferred moving Tenant %s: %s", tenant.name, message)
            event = (DEFERRED, message)
        return MoveStep(source, source, event=event, pending=True)

    async def _target_ready(self, tenant: Tenant, shard: str) -> bool:
        """The shard's pod is Ready (its readiness probe passed, not terminating)."""
        now = time.monotonic()
        seen = self._ready.get(shard)
        if seen is not None and now - seen[0] < READY_CACHE_S:
            return seen[1]
        pod = await self.api.get(resource_path("v1", "pods", tenant.namespace, shard))
        ready = pod_ready(pod)
        self._ready[shard] = (now, ready, "" if ready else pod_says(shard, pod))
        return ready

    async def _alive(self, tenant: Tenant, shard: str) -> bool:
        """The shard's pod exists (terminating included: a scaled-in shard hands off until it exits)."""
        return await self.api.get(resource_path("v1", "pods", tenant.namespace, shard)) is not None

    async def _begin(self, tenant: Tenant, source: str, target: str) -> MoveStep:
        now = self.clock()
        record: JSON = {"source": source, "target": target, "startedAt": now}
        if tenant.spec is None or tenant.spec.snapshot.policy != ON_MOVE:
            log.info("Moving Tenant %s from=%s to=%s (no Snapshot: policy)", tenant.name, source, target)
            return MoveStep(target, source, {**record, "phase": RESTORING})
        name = snapshot_name(tenant.name, MOVE, short_id(tenant.uid, source, target, now))
        await self._create(tenant, name)
        log.info("Moving Tenant %s from=%s to=%s holding for Snapshot %s", tenant.name, source, target, name)
        return MoveStep(source, source, {**record, "snapshot": name, "phase": HOLDING})

    async def _holding(
        self,
        tenant: Tenant,
        move: Mapping[str, Any],
        source: str,
        target: str,
        waited: float,
        leaving: bool,
        limit: float,
    ) -> MoveStep:
        name = str(move.get("snapshot") or "")
        snapshot = self.snapshots.get(name)
        if snapshot is not None:
            self._created.discard(name)  # the cache has it now
        phase = phase_of(snapshot) if snapshot is not None else ""
        if phase == READY:
            log.info("Moving Tenant %s to=%s: Snapshot %s Ready, restoring there", tenant.name, target, name)
            return MoveStep(target, source, {**move, "phase": RESTORING})
        if phase == FAILED:
            message = str((snapshot or {}).get("status", {}).get("message") or "")
            why = f"move Snapshot {name} Failed: {message}".rstrip(": ")
            return await self._give_up(tenant, move, target, why, leaving)
        if waited >= limit:
            why = f"move Snapshot {name} not Ready after {waited:.0f}s"
            return await self._give_up(tenant, move, target, why, leaving)
        if snapshot is None and name not in self._created:  # lost (deleted, or a restart): again
            await self._create(tenant, name)
        return MoveStep(source, source, move)

    async def _give_up(
        self, tenant: Tenant, move: Mapping[str, Any], to: str, why: str, leaving: bool
    ) -> MoveStep:
        """Roll back to the source; a source leaving the shard set has nothing to roll back to, so
        the tenant goes on to `to`, which restores its newest Ready Snapshot."""
        source, name = str(move["source"]), str(move.get("snapshot") or "")
        self._created.discard(name)
        snapshot = self.snapshots.get(name)
        if name and (snapshot is None or phase_of(snapshot) not in (READY, FAILED)):
            # Unfinished: a source serving again must never capture it later (writes after it would
            # look lost to the next move); shards capture a move Snapshot only at the barrier anyway.
            await self.api.delete(resource_path(API_VERSION, SNAPSHOT.plural, tenant.namespace, name))
        if leaving:
            message = f"move from {source} (leaving) to {to} without its capture: {why}"
            log.warning("Moved Tenant %s without a capture: %s", tenant.name, message)
            return MoveStep(to, to, None, (NOT_CAPTURED, message))
        wait = self._back_off(tenant, why, self._now())
        message = (
            f"move from {source} to {move.get('target')} rolled back: {why}; {source} serves it again"
            f" and no new move starts for {wait:.0f}s"
        )
        log.warning("Rolled back moving Tenant %s: %s", tenant.name, message)
        return MoveStep(source, source, None, (ROLLED_BACK, message))

    def _waited(self, move: Mapping[str, Any]) -> float:
        now = self.clock()
        return (parse_rfc3339(now) - parse_rfc3339(str(move.get("startedAt") or now))).total_seconds()

    def _backoffs(self, now: float) -> dict[str, Backoff]:
        """The rollbacks that still count; one long past (MOVE_BACKOFF_MAX_S after its back-off)
        is forgotten: a tenant's next rollback counts from one again."""
        for name in [n for n, b in self._backoff.items() if now >= b.until + MOVE_BACKOFF_MAX_S]:
            del self._backoff[name]
        return self._backoff

    def _now(self) -> float:
        return parse_rfc3339(self.clock()).timestamp()

    async def _create(self, tenant: Tenant, name: str) -> None:
        path = resource_path(API_VERSION, SNAPSHOT.plural, tenant.namespace)
        await self.api.create(path, build_snapshot(tenant, name, MOVE))  # 409 (exists) is fine
        self._created.add(name)
