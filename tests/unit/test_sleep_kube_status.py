"""A sleeping tenant as Kubernetes sees it: the shard reports Asleep and the phase follows, a request
wakes it and the phase is Ready again (real KubeSource, Shard and CPU backend; a fake API server)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tensorwasm.runtime.snapshots.store import SnapshotStore
from tests.fake_kube import FakeKube
from tests.unit.test_kube_source_inprocess import TENANTS, running_source, runtime_of, scenario, tenant


def test_a_sleeping_tenant_is_reported_asleep_and_ready_again_after_a_request(tmp_path: Path) -> None:
    async def body(fake: FakeKube) -> None:
        # spec.idle.after is at least 10s (a tenant's choice); the shard's default may be shorter.
        await fake.put(TENANTS, tenant("alpha"))
        async with running_source(fake, sleep_store=SnapshotStore(tmp_path), idle_after_s=0.2) as (
            shard,
            _,
            _,
        ):
            await fake.wait_for(lambda: runtime_of(fake, "alpha").get("reason") == "Asleep")
            status = fake.get(TENANTS, "alpha")["status"]  # type: ignore[index]
            assert status["phase"] == "Asleep" and status["gpuBytesInUse"] == 0
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            assert (ready["status"], ready["reason"]) == ("True", "Asleep")
            # A new idle.after keeps the same module: no reload, it stays asleep at the new generation.
            await fake.put(TENANTS, tenant("alpha", idle={"after": "1h"}))
            await fake.wait_for(lambda: runtime_of(fake, "alpha").get("observedGeneration") == 2)
            assert runtime_of(fake, "alpha")["reason"] == "Asleep" and shard.served["alpha"].asleep
            # The first request wakes it (on a worker thread, as the invoke path does).
            answer = await asyncio.to_thread(shard.served["alpha"].invoke, "echo", b"hi")
            assert answer == b"hi"
            await fake.wait_for(lambda: "woke in" in runtime_of(fake, "alpha").get("message", ""))
            assert fake.get(TENANTS, "alpha")["status"]["phase"] == "Ready"  # type: ignore[index]

    scenario(body)
