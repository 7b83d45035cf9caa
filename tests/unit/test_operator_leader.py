"""Leader election on a coordination.k8s.io Lease: one leader, a standby that takes over, never two.

Two real LeaderElectors against tests/fake_kube.py (the API server stand-in; compare-and-swap on
resourceVersion as the real one does). A leader "dies" by no longer renewing (its task cancelled,
what SIGKILL leaves behind). The waits are on state; the only clock is the electors' own.
The same protocol between two real operator processes: tests/cluster/test_operator_startup.py.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.kube.client import KubeError
from tensorwasm.operator.health import Readiness
from tensorwasm.operator.leader import LeaderElector
from tensorwasm.operator.preflight import StartupError
from tests.fake_kube import FakeKube, with_fake_kube
from tests.unit.test_operator_preflight import kubeconfig

NS = "team-a"
LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"


def elector(fake: FakeKube, identity: str) -> LeaderElector:
    return LeaderElector(fake.client("tensorwasm-operator"), NS, "tw", identity, 3, 2, 1)


def holder(fake: FakeKube) -> Any:
    return ((fake.get(LEASES, "tw") or {}).get("spec") or {}).get("holderIdentity")


def test_one_leader_then_the_standby_takes_over_once_the_dead_leaders_lease_expires() -> None:
    async def body(fake: FakeKube) -> None:
        a, b = elector(fake, "a"), elector(fake, "b")
        await a.acquire()
        assert holder(fake) == "a"
        a_holds = asyncio.create_task(a.hold())
        standby: list[str] = []
        b_acquires = asyncio.create_task(b.acquire(lambda: standby.append(holder(fake))))
        # b keeps waiting while a renews: several renewals pass with b still standing by.
        renewals = fake.version
        await fake.wait_for(lambda: fake.version >= renewals + 4, timeout=60)
        assert not b_acquires.done() and holder(fake) == "a" and set(standby) == {"a"}
        a_holds.cancel()  # a dies: no more renewals
        await asyncio.wait_for(b_acquires, 60)
        assert holder(fake) == "b"
        assert fake.get(LEASES, "tw")["spec"]["leaseTransitions"] == 1  # type: ignore[index]
        # a, were it only paused, finds the Lease taken at its next renewal and gives up.
        assert await asyncio.wait_for(a.hold(), 60) is None
        await a.api.close()
        await b.api.close()

    with_fake_kube(body)


def test_a_graceful_stop_releases_the_lease_and_the_standby_leads_on_its_next_try() -> None:
    async def body(fake: FakeKube) -> None:
        # a's Lease lasts an hour: were the release not honoured, b would wait that long (the guard trips).
        a = LeaderElector(fake.client("tensorwasm-operator"), NS, "tw", "a", 3600, 2, 1)
        b = elector(fake, "b")
        await a.acquire()
        a_holds = asyncio.create_task(a.hold())
        b_acquires = asyncio.create_task(b.acquire())
        await fake.wait_for(lambda: b.holder == "a", timeout=60)
        a_holds.cancel()
        await a.release()
        assert holder(fake) is None
        await asyncio.wait_for(b_acquires, 60)
        assert holder(fake) == "b"
        await a.api.close()
        await b.api.close()

    with_fake_kube(body)


def test_a_leader_that_cannot_renew_gives_up_before_the_lease_expires() -> None:
    async def body(fake: FakeKube) -> None:
        a = elector(fake, "a")
        await a.acquire()
        fake.fail("PATCH", f"{LEASES}/tw", *[503] * 50)  # the API server is unreachable for a
        await asyncio.wait_for(a.hold(), 60)  # returns: the caller stops writing (exits)
        assert fake.failures[("PATCH", f"{LEASES}/tw")]  # it gave up while renewals still failed
        await a.api.close()

    with_fake_kube(body)


def test_a_forbidden_lease_ends_the_campaign_with_one_line_instead_of_a_ready_standby() -> None:
    async def body(fake: FakeKube) -> None:
        b = elector(fake, "b")
        fake.fail("GET", f"{LEASES}/tw", 403)  # RBAC: the Role names another Lease, or none
        with pytest.raises(StartupError) as refused:
            await asyncio.wait_for(b.acquire(), 30)
        line = str(refused.value)
        assert "\n" not in line and "leader Lease team-a/tw" in line and "rbac.create" in line
        await b.api.close()

    with_fake_kube(body)


def test_a_standby_that_cannot_read_the_lease_for_a_lease_duration_is_not_ready() -> None:
    async def body(fake: FakeKube) -> None:
        now = [0.0]
        a = elector(fake, "a")
        b = LeaderElector(fake.client("tensorwasm-operator"), NS, "tw", "b", 3, 2, 1, clock=lambda: now[0])
        readiness = Readiness()
        readiness.api_reached, readiness.lease_fresh = True, b.fresh
        read = asyncio.Event()

        def standby() -> None:
            readiness.role = "standby"
            read.set()

        await a.acquire()
        a_holds = asyncio.create_task(a.hold())
        b_acquires = asyncio.create_task(b.acquire(standby))
        await asyncio.wait_for(read.wait(), 30)
        assert readiness.ready
        key = ("GET", f"{LEASES}/tw")
        fake.fail(*key, *[503] * 1000)  # b's reads fail from now on
        read.clear()
        while len(fake.failures[key]) > 998:  # two reads failed (b retries every second)
            await asyncio.sleep(0.05)
        now[0] += 2.9  # within a lease duration of its last read: still a standby that sees the Lease
        assert readiness.ready
        now[0] += 0.1  # a lease duration without a read
        assert not readiness.ready and "lease=unread" in readiness.describe()
        fake.failures[key].clear()  # reads come back
        await asyncio.wait_for(read.wait(), 30)
        assert readiness.ready and not b_acquires.done()  # a still renews: b stands by
        a_holds.cancel()
        b_acquires.cancel()
        await a.api.close()
        await b.api.close()

    with_fake_kube(body)


class SlowApiServer:
    """The Lease's API server, answering the first renewal `delay_s` after it was sent (the write
    itself landed at once) and failing every later one; it advances the elector's clock."""

    def __init__(self, now: list[float], delay_s: float) -> None:
        self.now, self.delay_s, self.renewals = now, delay_s, 0

    async def get(self, path: str) -> None:
        return None

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "metadata": {**body["metadata"], "resourceVersion": "1"}}

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.renewals += 1
        if self.renewals > 1:
            raise KubeError(503, "ServiceUnavailable", "etcd is slow")
        self.now[0] += self.delay_s
        return {"metadata": {"resourceVersion": "2"}}


def test_the_renew_deadline_counts_from_when_the_last_good_renewal_was_sent_not_answered() -> None:
    # Lease 8 s, renew deadline 6 s. A renewal sent at t=0 is answered at t=6; the next fails at
    # t=6. The standby's clock for that renewal may have started at t=0 (written at once): the
    # leader must stop now (6 s since it sent), not count 6 s more from the slow answer.
    async def body() -> None:
        now = [0.0]
        api = SlowApiServer(now, 6.0)
        a = LeaderElector(api, NS, "tw", "a", 8, 6, 1, clock=lambda: now[0])  # type: ignore[arg-type]
        await a.acquire()
        await asyncio.wait_for(a.hold(), 30)  # returns: the caller stops writing
        assert api.renewals == 2 and now[0] == 6.0

    asyncio.run(body())


def test_the_operator_process_exits_1_with_one_line_when_its_lease_is_forbidden(tmp_path: Path) -> None:
    # The process, not only the elector: no standby left running (and Ready) with nobody leading.
    async def body(fake: FakeKube) -> None:
        fake.fail("GET", f"{LEASES}/tw", 403)
        code = (
            "from tensorwasm.operator.main import run\n"
            "from tensorwasm.operator.settings import OperatorSettings\n"
            f"run(OperatorSettings(namespace={NS!r}, leader_election_lease='tw', identity='a'))\n"
        )
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORWASM_", "KUBERNETES_"))}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code,
            env={**clean, "KUBECONFIG": str(kubeconfig(tmp_path, fake.url))},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 120)  # a guard for a broken test only
        assert proc.returncode == 1, err.decode()
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1, err.decode()
        assert lines[0].startswith("tensorwasm operator: the API server refused the leader Lease team-a/tw")
        assert fake.failures[("GET", f"{LEASES}/tw")] == []  # it asked once and did not retry

    with_fake_kube(body)
