"""Leader election on a coordination.k8s.io Lease: one leader, a standby that takes over, never two.

Two real LeaderElectors against tests/fake_kube.py (the API server stand-in; compare-and-swap on
resourceVersion as the real one does). A leader "dies" by no longer renewing (its task cancelled,
what SIGKILL leaves behind). The waits are on state; the only clock is the electors' own.
The same protocol between two real operator processes: tests/cluster/test_operator_startup.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tensorwasm.operator.leader import LeaderElector
from tests.fake_kube import FakeKube, with_fake_kube

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
