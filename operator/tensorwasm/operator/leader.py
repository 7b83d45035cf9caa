"""Leader election through a coordination.k8s.io/v1 Lease, so two operator replicas never both write.

Owns the Lease protocol (the one client-go's leaderelection uses): a standby takes the Lease when
its holder is empty or the record has not changed for leaseDurationSeconds *as this process saw it*
(its own monotonic clock, so skew between nodes does not matter); every write is a compare-and-swap
on resourceVersion. The leader renews every `retry_s`; when it could not renew for `renew_deadline_s`
(< the lease duration) it must stop writing at once: `hold` returns and the caller exits, so the
standby, which waits the full duration, never overlaps it. A graceful stop empties holderIdentity,
and a standby takes over on its next try. The leader's renew deadline counts from when it SENT
its last successful renewal (the API server wrote it at that moment or later, so the standby's
clock for that version starts no earlier), however slow the answer was. A Lease this process may
not read or write (401/403: RBAC missing or naming another Lease) is not retried: `acquire`
raises StartupError with one line, and the process exits. A standby that has not read the Lease
for a lease duration is not `fresh` (/readyz says so). Why not kopf peering: peers of equal
priority all keep running (kopf only warns), and its keep-alive is 60 s. Must not import kopf.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp

from tensorwasm.kube.client import KubeApi, KubeError, resource_path
from tensorwasm.operator.preflight import StartupError, lease_refused

log = logging.getLogger("tensorwasm.operator")

LEASES = ("coordination.k8s.io/v1", "leases")
TRANSIENT = (KubeError, aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)


def micro_time(at: datetime | None = None) -> str:
    """A Lease's MicroTime: RFC 3339 with microseconds, UTC."""
    return (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """One per operator process. `acquire()` returns once this process leads; `hold()` returns
    when it no longer may (the caller then stops every write, by exiting)."""

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        name: str,
        identity: str,
        duration_s: int,
        renew_deadline_s: int,
        retry_s: int,
        clock: Callable[[], float] = time.monotonic,
        owner: dict[str, Any] | None = None,
    ) -> None:
        assert retry_s < renew_deadline_s < duration_s
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.duration_s, self.renew_deadline_s, self.retry_s = duration_s, renew_deadline_s, retry_s
        self.clock = clock
        self.owner = owner  # the operator's Deployment: helm uninstall removes the Lease with it
        self.path = resource_path(*LEASES, namespace, name)
        self._seen: tuple[str, float] = ("", 0.0)  # (resourceVersion, when this process first saw it)
        self._version = ""  # resourceVersion of our own last write
        self.holder = ""  # the holder last seen (for logs and tests)
        self._read_at = clock()  # when this process last read the Lease (or started trying)

    def fresh(self) -> bool:
        """This process read the Lease within the last lease duration (a standby that cannot see
        the Lease cannot take over: it is not a ready standby)."""
        return self.clock() - self._read_at < self.duration_s

    async def acquire(self, on_standby: Callable[[], None] | None = None) -> None:
        """Return once this process leads; raise StartupError when the Lease is forbidden to it."""
        logged = False
        self._read_at = self.clock()
        while True:
            try:
                if await self._try_acquire():
                    log.info("Acquired Lease %s/%s identity=%s", self.namespace, self.name, self.identity)
                    return
                if on_standby is not None:
                    on_standby()
                if not logged:
                    log.info(
                        "Waiting as standby Lease %s/%s holder=%s", self.namespace, self.name, self.holder
                    )
                    logged = True
            except TRANSIENT as exc:
                if isinstance(exc, KubeError) and exc.status in (401, 403):
                    raise StartupError(lease_refused(exc, self.namespace, self.name)) from None
                log.warning("Failed to read or take Lease %s/%s: %s", self.namespace, self.name, exc)
            await asyncio.sleep(self.retry_s)

    async def hold(self) -> None:
        """Renew until renewal fails for renew_deadline_s, or someone else holds the Lease; then return."""
        last_ok = self.clock()
        while True:
            await asyncio.sleep(self.retry_s)
            sent = self.clock()  # the write lands at this moment or later: count the deadline from here
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
                async with asyncio.timeout(max(0.5, self.renew_deadline_s - (sent - last_ok))):
                    await self._renew()
                last_ok = sent
                continue
            except KubeError as exc:
                if exc.status == 409:  # our resourceVersion is stale: someone else wrote the Lease
                    lease = await self._read_quietly()
                    holder = ((lease or {}).get("spec") or {}).get("holderIdentity")
                    if lease is not None and holder == self.identity:
                        self._version = lease["metadata"]["resourceVersion"]
                        continue
                    log.error("Lost Lease %s/%s to holder=%s", self.namespace, self.name, holder)
                    return
                failure: Exception = exc
            except TRANSIENT as exc:
                failure = exc
            if self.clock() - last_ok >= self.renew_deadline_s:
                log.error(
                    "Lost Lease %s/%s: not renewed for %d s (%s)",
                    self.namespace, self.name, self.renew_deadline_s, failure,
                )  # fmt: skip
                return

    async def release(self) -> None:
        """Empty holderIdentity so a standby takes over on its next try (best effort)."""
        if not self._version:
            return
        for _ in range(3):
            patch = {"metadata": {"resourceVersion": self._version}, "spec": {"holderIdentity": None}}
            try:
                await self.api.merge_patch(self.path, patch)
                log.info("Released Lease %s/%s", self.namespace, self.name)
                return
            except KubeError as exc:
                # A renewal cancelled in flight may have landed: release that version if still ours.
                lease = await self._read_quietly() if exc.status == 409 else None
                if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                    log.warning("Failed to release Lease %s/%s: %s", self.namespace, self.name, exc)
                    return
                self._version = lease["metadata"]["resourceVersion"]
            except TRANSIENT as exc:
                log.warning("Failed to release Lease %s/%s: %s", self.namespace, self.name, exc)
                return

    # -- the protocol ---------------------------------------------------------------------------
    def _spec(self, transitions: int, acquired: str | None = None) -> dict[str, Any]:
        now = micro_time()
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration_s,
            "acquireTime": acquired or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    async def _try_acquire(self) -> bool:
        lease = await self.api.get(self.path)
        self._read_at = self.clock()
        if lease is None:
            body = {
                "apiVersion": LEASES[0],
                "kind": "Lease",
                "metadata": {
                    "name": self.name,
                    "namespace": self.namespace,
                    **({"ownerReferences": [self.owner]} if self.owner else {}),
                },
                "spec": self._spec(0),
            }
            created = await self.api.create(resource_path(*LEASES, self.namespace), body)
            if created is None:  # another replica created it first
                return False
            self._version = created["metadata"]["resourceVersion"]
            return True
        version = lease["metadata"]["resourceVersion"]
        if version != self._seen[0]:
            self._seen = (version, self.clock())
        spec = lease.get("spec") or {}
        self.holder = str(spec.get("holderIdentity") or "")
        duration = int(spec.get("leaseDurationSeconds") or self.duration_s)
        expired = self.clock() - self._seen[1] >= duration
        if self.holder and self.holder != self.identity and not expired:
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + (self.holder != self.identity)
        patch = {"metadata": {"resourceVersion": version}, "spec": self._spec(transitions)}
        try:
            updated = await self.api.merge_patch(self.path, patch)
        except KubeError as exc:
            if exc.status == 409:  # someone else wrote it between our read and our write
                return False
            raise
        self._version = updated["metadata"]["resourceVersion"]
        return True

    async def _renew(self) -> None:
        patch = {"metadata": {"resourceVersion": self._version}, "spec": {"renewTime": micro_time()}}
        updated = await self.api.merge_patch(self.path, patch)
        self._version = updated["metadata"]["resourceVersion"]

    async def _read_quietly(self) -> dict[str, Any] | None:
        try:
            return await self.api.get(self.path)
        except TRANSIENT:
            return None
