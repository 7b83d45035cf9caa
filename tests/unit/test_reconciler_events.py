"""Events on every phase change of a Tenant, whoever wrote the phase: the operator or the serving shard.

The real Reconciler against tests/fake_kube.py (the one stand-in: the API server), driven by the
same watcher as tests/unit/test_reconciler_inprocess.py. A shard's status write is made with the
runtime's own function (readiness_patch), as a shard pod sends it.
"""

from __future__ import annotations

from typing import Any

from tensorwasm.runtime.sources.kube import readiness_patch
from tests.fake_kube import FakeKube, with_fake_kube
from tests.unit.test_reconciler_inprocess import NS, TENANTS, operator, status, tenant

EVENTS = f"/api/v1/namespaces/{NS}/events"


def events(fake: FakeKube, name: str) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events about Tenant `name`, oldest first."""
    found = [e for e in fake.items(EVENTS) if e["involvedObject"]["name"] == name]
    found.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
    for e in found:
        assert e["involvedObject"]["kind"] == "Tenant" and e["involvedObject"]["uid"]
    return [(e["type"], e["reason"], e["message"]) for e in found]


async def shard_reports(fake: FakeKube, name: str, loaded: bool, reason: str, message: str) -> None:
    """What the serving shard writes: status.runtime and the readiness it implies (phase included)."""
    body: Any = fake.get(TENANTS, name)
    runtime = {
        "shard": body["status"]["shard"],
        "observedGeneration": body["metadata"]["generation"],
        "loaded": loaded,
        "reason": reason,
        "message": message,
        "gpuBytesInUse": 0,
        "reportedAt": "2026-11-29T12:00:00Z",
    }
    patch = readiness_patch(body, runtime, "2026-11-29T12:00:01Z")
    assert "phase" in patch  # the shard itself moves the phase: the operator must still say so
    await fake.put_status(TENANTS, name, {"runtime": runtime, **patch})


def test_each_phase_change_posts_one_event_with_reason_and_message_even_when_a_shard_wrote_it() -> None:
    async def body(fake: FakeKube) -> None:
        async with operator(fake) as reconciler:
            await fake.put(TENANTS, tenant("a"))
            await fake.wait_for(lambda: status(fake, "a").get("phase") == "Placed")
            await fake.wait_for(lambda: events(fake, "a"))
            await reconciler.drain()
            assert [e[:2] for e in events(fake, "a")] == [("Normal", "AwaitingShard")]
            assert "New -> Placed on shard tensorwasm-shard-" in events(fake, "a")[0][2]

            await shard_reports(fake, "a", False, "DigestMismatch", "module sha256 is 99ab, spec says aaaa")
            await fake.wait_for(lambda: len(events(fake, "a")) == 2)
            kind, reason, message = events(fake, "a")[1]
            assert (kind, reason) == ("Warning", "DigestMismatch")
            assert "Placed -> Degraded" in message and "spec says aaaa" in message

            await shard_reports(fake, "a", True, "ModuleLoaded", "")
            await fake.wait_for(lambda: len(events(fake, "a")) == 3)
            assert events(fake, "a")[2][:2] == ("Normal", "Serving")
            # Redelivering the same version (a re-list, a watch echo) posts nothing more.
            for _ in range(2):
                await reconciler.on_tenant("MODIFIED", fake.get(TENANTS, "a"))  # type: ignore[arg-type]
            await reconciler.drain()
            assert len(events(fake, "a")) == 3

            # An invalid spec: the operator writes Failed, with the field in the message.
            await fake.put(TENANTS, tenant("bad", limits={"timeoutMs": 700_000}))
            await fake.wait_for(lambda: events(fake, "bad"))
            assert events(fake, "bad")[0][:2] == ("Warning", "InvalidSpec")
            assert "spec.limits.timeoutMs" in events(fake, "bad")[0][2]

    with_fake_kube(body)


def test_sleeping_and_waking_post_no_event_but_a_warning_after_them_still_does() -> None:
    # Idle sleep flips a tenant Ready <-> Asleep all day: an Event each time would be a write per
    # flip per tenant (the shard's status write and the sleep/wake metrics already say it).
    async def body(fake: FakeKube) -> None:
        async with operator(fake):
            await fake.put(TENANTS, tenant("a"))
            await fake.wait_for(lambda: status(fake, "a").get("phase") == "Placed")
            await shard_reports(fake, "a", True, "ModuleLoaded", "")
            await fake.wait_for(lambda: len(events(fake, "a")) == 2)
            assert status(fake, "a")["phase"] == "Ready"
            for _ in range(3):
                await shard_reports(fake, "a", True, "Asleep", "asleep in a snapshot")
                await fake.wait_for(lambda: status(fake, "a").get("phase") == "Asleep")
                await shard_reports(fake, "a", True, "ModuleLoaded", "")
                await fake.wait_for(lambda: status(fake, "a").get("phase") == "Ready")
            await shard_reports(fake, "a", True, "Asleep", "asleep in a snapshot")
            await shard_reports(fake, "a", False, "WakeFailed", "snapshot signed with an unknown key")
            # Events are posted in watch order: once the Warning is there, every flip before it was seen.
            await fake.wait_for(lambda: len(events(fake, "a")) >= 3)
            assert [e[:2] for e in events(fake, "a")] == [
                ("Normal", "AwaitingShard"),
                ("Normal", "Serving"),
                ("Warning", "WakeFailed"),
            ]
            assert "Asleep -> Degraded" in events(fake, "a")[2][2]

    with_fake_kube(body)


def test_a_restarted_operator_posts_no_event_for_phases_it_finds() -> None:
    async def body(fake: FakeKube) -> None:
        async with operator(fake):
            await fake.put(TENANTS, tenant("a"))
            await fake.wait_for(lambda: events(fake, "a"))
        before = len(fake.items(EVENTS))
        async with operator(fake) as reconciler:
            await reconciler.drain()
            await reconciler.on_tenant("MODIFIED", fake.get(TENANTS, "a"))  # type: ignore[arg-type]
            await reconciler.drain()
        assert len(fake.items(EVENTS)) == before

    with_fake_kube(body)
