"""The operator rolls the shard pods to a new revision itself, so no tenant is ever without a shard.

Owns `ShardRoll`. The shard StatefulSet uses updateStrategy OnDelete, so a new revision (a
`helm upgrade` to a new image) replaces nothing by itself. Each `tick` looks at the StatefulSet and
its pods and takes the next step, one shard at a time:
1. surge: record the user's replica count R in the StatefulSet's annotation `tensorwasm.io/roll`
   (the roll's whole state: a restarted operator resumes from it) and scale to R+1; the extra pod
   starts on the new revision;
2. drain the lowest outdated shard k: move each of its tenants (the move protocol of moves.py:
   barrier, capture, restore, re-point: no request lost) to a Ready shard of the new revision
   (the surge shard or one already replaced) that has room for it, else to another Ready shard
   with room (it moves again when that one's turn comes); room is checked on the placement
   ledger, counting tenants still resident on a shard they are moving away from, by the current
   admission model, else by the mean model shards were filled by before it (the reconciler's
   `fits_as_admitted`, with an OverAdmissionModel Event: a roll moves what was admitted, one
   shard's tenants always fit an empty one by it, so the upgrade's roll cannot wedge). When no shard
   has room and no move is in flight that will free some, the roll waits and says so (a Warning
   log line and an Event on the StatefulSet, reason RollWaitingForRoom);
3. once no tenant is on k or moving from it, delete pod k; the StatefulSet recreates it on the
   new revision; wait until it is Ready, then the next outdated shard;
4. none left: scale back to R (the surge shard hands its tenants back as any scaled-in shard does)
   and remove the annotation.
Bounded: one roll at a time, one shard at a time; each move is bounded by its deadline
(MOVE_SNAPSHOT_TIMEOUT plus the tenant's timeoutMs, moves.py) and rolls back; a tenant placed
again after a rollback is not held again before its back-off is over (moves.py: the drain waits,
with a MoveDeferred Event on the Tenant), and a pod that does not become Ready leaves the roll
waiting, visibly, in the annotation and the log. An annotation that does not parse is logged as an
error and removed, and the roll starts over from the replica count the StatefulSet has then. Must
not import kopf; I/O only through the KubeApi it is given.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tensorwasm.api.names import shard_ordinal, shard_pod_name
from tensorwasm.kube.client import KubeApi, resource_path
from tensorwasm.operator.pods import pod_ready

log = logging.getLogger("tensorwasm.operator")

ROLL_ANNOTATION = "tensorwasm.io/roll"
REVISION_LABEL = "controller-revision-hash"
NO_ROOM = "RollWaitingForRoom"  # the Event's reason when a drained shard's tenants fit nowhere


def roll_state(annotations: Mapping[str, Any]) -> int | None:
    """The user's replica count R recorded in the roll annotation; None without one.

    Raises ValueError when the annotation is there but is not {"replicas": <int >= 0>}."""
    raw = annotations.get(ROLL_ANNOTATION)
    if raw is None:
        return None
    try:
        state = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    replicas = state.get("replicas") if isinstance(state, dict) else None
    if type(replicas) is not int or replicas < 0:  # bool is an int subclass: not a count
        raise ValueError(f'expected {{"replicas": <integer >= 0>}}, got {str(raw)[:100]!r}')
    return replicas


def outdated(pods: Mapping[str, Mapping[str, Any]], revision: str, prefix: str, replicas: int) -> list[int]:
    """Ordinals below `replicas` whose pod runs another revision than `revision` (lowest first)."""
    out = []
    for ordinal in range(replicas):
        pod = pods.get(shard_pod_name(prefix, ordinal))
        labels = ((pod or {}).get("metadata") or {}).get("labels") or {}
        if pod is not None and labels.get(REVISION_LABEL) not in (None, revision):
            out.append(ordinal)
    return out


class ShardRoll:
    """Called by the reconciler on every StatefulSet event and periodically."""

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        shard_name: str,
        placements: Callable[[], Mapping[str, str | None]],
        moving: Callable[[], Mapping[str, Mapping[str, Any]]],
        place_away: Callable[[str, int, Sequence[Sequence[int]]], int | None],
    ) -> None:
        """`placements`: tenant -> status.shard; `moving`: tenant -> status.move in flight;
        `place_away(tenant, ordinal, tiers)`: make the ledger move the tenant off shard `ordinal`
        to a shard of the first tier that has room for it (capacity-checked); the shard it goes
        to, or None when none has room."""
        self.api, self.namespace, self.shard_name = api, namespace, shard_name
        self.placements, self.moving, self.place_away = placements, moving, place_away
        self._stuck: tuple[str, ...] = ()  # tenants last reported fitting nowhere (said once)

    async def tick(self) -> str:
        """Take the next step of a roll, if one is due; a word for the log and tests."""
        path = resource_path("apps/v1", "statefulsets", self.namespace, self.shard_name)
        sts = await self.api.get(path)
        if sts is None:
            return "none"
        revision = str((sts.get("status") or {}).get("updateRevision") or "")
        if not revision or (sts.get("spec") or {}).get("updateStrategy", {}).get("type") != "OnDelete":
            return "none"
        annotations = (sts.get("metadata") or {}).get("annotations") or {}
        try:
            state = roll_state(annotations)
        except ValueError as exc:
            await self.api.merge_patch(path, {"metadata": {"annotations": {ROLL_ANNOTATION: None}}})
            log.error(
                "Removed the malformed annotation %s of StatefulSet %s/%s (%s); the roll starts over "
                "from replicas=%s",
                ROLL_ANNOTATION, self.namespace, self.shard_name, exc,
                (sts.get("spec") or {}).get("replicas"),
            )  # fmt: skip
            return "repaired"
        replicas = state if state is not None else int((sts.get("spec") or {}).get("replicas") or 0)
        pods = await self._pods()
        stale = outdated(pods, revision, self.shard_name, replicas)
        if state is None:
            if not stale:
                return "none"
            body = {"metadata": {"annotations": {ROLL_ANNOTATION: json.dumps({"replicas": replicas})}},
                    "spec": {"replicas": replicas + 1}}  # fmt: skip
            await self.api.merge_patch(path, body)
            log.info(
                "Rolling shards to revision %s: surge to replicas=%d outdated=%s",
                revision,
                replicas + 1,
                stale,
            )
            return "surge"
        if int((sts.get("spec") or {}).get("replicas") or 0) != replicas + 1:
            # Scaled meanwhile (an autoscaler, a user): the roll needs its surge shard back; it
            # restores R at the end.
            await self.api.merge_patch(path, {"spec": {"replicas": replicas + 1}})
            log.warning("Scaled shards back to replicas=%d: a roll is under way", replicas + 1)
            return "surge again"
        surge = shard_pod_name(self.shard_name, replicas)
        if not pod_ready(pods.get(surge)):
            return "waiting for the surge shard"
        for ordinal in range(replicas):  # a replaced pod is Ready before the next one goes
            name = shard_pod_name(self.shard_name, ordinal)
            if ordinal not in stale and not pod_ready(pods.get(name)):
                return f"waiting for {name}"
        if not stale:
            if self.moving():
                return "waiting for moves"
            body = {"metadata": {"annotations": {ROLL_ANNOTATION: None}}, "spec": {"replicas": replicas}}
            await self.api.merge_patch(path, body)
            log.info("Rolled shards to revision %s; back to replicas=%d", revision, replicas)
            return "done"
        ordinal = stale[0]
        victim = shard_pod_name(self.shard_name, ordinal)
        on_victim = sorted(t for t, s in self.placements().items() if s == victim)
        tiers = self._targets(pods, revision, replicas, ordinal)
        stuck = tuple(t for t in on_victim if self.place_away(t, ordinal, tiers) is None)
        await self._say_stuck(sts, victim, stuck, tiers)
        if stuck:
            return f"waiting for room for {len(stuck)} tenant(s) of {victim}"
        if on_victim or self._busy(victim):
            return f"draining {victim}"
        if (pods[victim].get("metadata") or {}).get("deletionTimestamp"):
            return f"waiting for {victim}"
        await self.api.delete(resource_path("v1", "pods", self.namespace, victim))
        log.info("Deleted shard pod %s (drained) for revision %s", victim, revision)
        return f"replacing {victim}"

    def _targets(
        self, pods: Mapping[str, Mapping[str, Any]], revision: str, replicas: int, victim: int
    ) -> list[list[int]]:
        """[Ready shards on `revision` (surge included), other Ready shards], `victim` in neither."""
        fresh: list[int] = []
        other: list[int] = []
        for ordinal in range(replicas + 1):
            pod = pods.get(shard_pod_name(self.shard_name, ordinal))
            if ordinal == victim or pod is None or not pod_ready(pod):
                continue
            labels = (pod.get("metadata") or {}).get("labels") or {}
            (fresh if labels.get(REVISION_LABEL) == revision else other).append(ordinal)
        return [fresh, other]

    async def _say_stuck(
        self, sts: Mapping[str, Any], victim: str, stuck: tuple[str, ...], tiers: Sequence[Sequence[int]]
    ) -> None:
        """Log and post an Event when the set of tenants that fit nowhere changes (not every tick).

        Quiet while a move is in flight: a tenant moving away still counts on its source, and its
        room frees when the move ends (a wait of a few ticks is no news)."""
        if stuck == self._stuck or (stuck and self.moving()):
            return
        self._stuck = stuck
        if not stuck:
            log.info("Resumed draining shard %s: its tenants have room again", victim)
            return
        shown = ", ".join(stuck[:10]) + (f" and {len(stuck) - 10} more" if len(stuck) > 10 else "")
        message = (
            f"roll waits: no Ready shard {sorted(o for tier in tiers for o in tier)} has room for "
            f"{len(stuck)} tenant(s) of {victim} ({shown}); it goes on once room frees "
            "(a tenant deleted or its demand lowered)"
        )
        log.warning("Waiting in the shard roll of StatefulSet %s/%s: %s", self.namespace, self.shard_name,
                    message)  # fmt: skip
        involved = {**sts, "apiVersion": "apps/v1", "kind": "StatefulSet"}
        await self.api.post_event(involved, "Warning", NO_ROOM, message, "tensorwasm-operator")

    def _busy(self, shard: str) -> bool:
        """A move from or to `shard` is in flight."""
        return any(shard in (m.get("source"), m.get("target")) for m in self.moving().values())

    async def _pods(self) -> dict[str, dict[str, Any]]:
        items = await self.api.list(resource_path("v1", "pods", self.namespace))
        prefix = f"{self.shard_name}-"
        return {
            p["metadata"]["name"]: p
            for p in items
            if p["metadata"]["name"].startswith(prefix)
            and shard_ordinal(self.shard_name, p["metadata"]["name"]) is not None
        }
