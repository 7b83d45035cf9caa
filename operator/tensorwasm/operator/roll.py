"""The operator rolls the shard pods to a new revision itself, so no tenant is ever without a shard.

Owns `ShardRoll`. The shard StatefulSet uses updateStrategy OnDelete, so a new revision (a
`helm upgrade` to a new image) replaces nothing by itself. Each `tick` looks at the StatefulSet and
its pods and takes the next step, one shard at a time:
1. surge: record the user's replica count R in the StatefulSet's annotation `tensorwasm.io/roll`
   (the roll's whole state: a restarted operator resumes from it) and scale to R+1; the extra pod
   starts on the new revision;
2. drain the lowest outdated shard k: place its tenants on the surge shard (the move protocol of
   moves.py: barrier, capture, restore, re-point: no request lost);
3. once no tenant is on k or moving from it, delete pod k; the StatefulSet recreates it on the
   new revision; wait until it is Ready, then the next outdated shard;
4. none left: scale back to R (the surge shard hands its tenants back as any scaled-in shard does)
   and remove the annotation.
Bounded: one roll at a time, one shard at a time; each move is bounded by MOVE_SNAPSHOT_TIMEOUT
(and rolls back), and a pod that does not become Ready leaves the roll waiting, visibly, in the
annotation and the log. Must not import kopf; I/O only through the KubeApi it is given.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from tensorwasm.api.names import shard_ordinal, shard_pod_name
from tensorwasm.kube.client import KubeApi, resource_path

log = logging.getLogger("tensorwasm.operator")

ROLL_ANNOTATION = "tensorwasm.io/roll"
REVISION_LABEL = "controller-revision-hash"


def pod_ready(pod: Mapping[str, Any] | None) -> bool:
    if pod is None or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


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
        place_on: Callable[[str, int], None],
    ) -> None:
        """`placements`: tenant -> status.shard; `moving`: tenant -> status.move in flight;
        `place_on(tenant, ordinal)`: make the ledger place the tenant there (it moves)."""
        self.api, self.namespace, self.shard_name = api, namespace, shard_name
        self.placements, self.moving, self.place_on = placements, moving, place_on

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
        state = json.loads(annotations[ROLL_ANNOTATION]) if ROLL_ANNOTATION in annotations else None
        replicas = int(state["replicas"]) if state else int((sts.get("spec") or {}).get("replicas") or 0)
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
        on_victim = [t for t, s in self.placements().items() if s == victim]
        for tenant in on_victim:
            self.place_on(tenant, replicas)
        if on_victim or self._busy(victim):
            return f"draining {victim}"
        if (pods[victim].get("metadata") or {}).get("deletionTimestamp"):
            return f"waiting for {victim}"
        await self.api.delete(resource_path("v1", "pods", self.namespace, victim))
        log.info("Deleted shard pod %s (drained) for revision %s", victim, revision)
        return f"replacing {victim}"

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
