"""The move barrier and async jobs (review F16): a tenant held for a move fails the jobs it has not
started (kind tenant_moving) instead of running its whole backlog while every request waits; the one
running finishes. Real wasm (tests/fixtures/runaway.wat), engine, queue and HTTP server on loopback;
every wait is on state a client can read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.conftest import wait_for
from tests.runtime_fixtures import RuntimeServer, runtime_server, tenant  # noqa: F401

SPIN = "/v1/functions/spin/invoke?mode=async"


def jobs(server: RuntimeServer, token: str) -> dict[str, dict[str, Any]]:
    return {j["id"]: j for j in server.request("GET", "/v1/jobs", token=token).json()["jobs"]}


def test_a_held_tenant_fails_its_queued_jobs_and_its_barrier_waits_only_for_the_running_one(
    runtime_server: Callable[..., RuntimeServer],  # noqa: F811
) -> None:
    cfg = tenant("spinner", "runaway.wat", timeout_ms=1500, max_concurrency=1, queue_length=4)
    server = runtime_server([cfg])
    first, *queued = (server.request("POST", SPIN, b"", token=cfg.token).json()["id"] for _ in range(3))
    wait_for(lambda: jobs(server, cfg.token)[first]["state"] == "running", 60, "the first job running")

    async def hold_and_drain() -> None:
        assert server.shard.hold("spinner")
        await server.shard.served["spinner"].queue.drain()  # what the barrier waits for
        server.shard.release("spinner")

    server.run(hold_and_drain())
    seen = jobs(server, cfg.token)
    # The running job ran to its own end (its deadline); the queued ones never started.
    assert seen[first]["error"]["kind"] == "deadline_exceeded" and "startedAt" in seen[first]
    for job in queued:
        assert seen[job]["state"] == "failed" and seen[job]["error"]["kind"] == "tenant_moving"
        assert "startedAt" not in seen[job]
