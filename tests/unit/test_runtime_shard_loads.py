"""Loads are independent and bounded (issue 13): a module that spins while loading holds up no other
tenant and no reload, fails at its own deadline, and an update that cannot open leaves the previous
version serving."""

from __future__ import annotations

from dataclasses import replace

from tensorwasm.runtime.shard import LOADED, LOADING
from tests.runtime_fixtures import runtime_server, tenant  # noqa: F401  (fixture)

ALPHA = tenant("alpha", "echo.wat", ["echo"])


def test_a_stuck_load_holds_up_neither_other_tenants_nor_reloads(runtime_server) -> None:  # noqa: F811
    server = runtime_server([])
    shard = server.shard
    stuck = tenant("stuck", "start_spin.wat", timeout_ms=600_000)  # ten minutes: "for ever" here
    try:
        server.run(shard.sync([stuck], wait=False))
        assert shard.status("stuck") is not None and shard.status("stuck").reason == LOADING  # type: ignore[union-attr]
        # A later sync returns once its own loads are done, with the stuck one still going.
        server.sync([stuck, ALPHA])
        assert shard.status("alpha").reason == LOADED  # type: ignore[union-attr]
        assert server.invoke(ALPHA, "echo", b"hi").body == b"hi"
        assert shard.status("stuck").reason == LOADING  # type: ignore[union-attr]
        ready, detail = shard.readiness()
        assert not ready and detail["loading"] == ["stuck"]
        # A token rotation of alpha meanwhile is applied at once.
        rotated = replace(ALPHA, token="rotated-alpha-token", generation=2)
        server.sync([stuck, rotated])
        assert server.invoke(rotated, "echo", b"r").body == b"r"
        # Shutdown interrupts the stuck start function whatever its deadline (then teardown closes).
        shard.engine.interrupt_all()
        server.run(shard.settled())
        assert shard.status("stuck").reason == "ModuleRejected"  # type: ignore[union-attr]
        assert "start function ran past the deadline" in shard.status("stuck").message  # type: ignore[union-attr]
    finally:
        shard.engine.interrupt_all()  # never leave a ten-minute load behind a failed assertion


def test_a_start_function_that_spins_fails_that_tenant_at_its_deadline(runtime_server) -> None:  # noqa: F811
    server = runtime_server([ALPHA])
    server.sync([ALPHA, tenant("stuck", "start_spin.wat", timeout_ms=50)])
    status = server.shard.status("stuck")
    assert status is not None and not status.loaded and status.reason == "ModuleRejected"
    assert "deadline" in status.message
    assert server.invoke(ALPHA, "echo", b"a").body == b"a"


def test_an_update_that_fails_tw_init_keeps_the_old_version_serving(runtime_server) -> None:  # noqa: F811
    server = runtime_server([ALPHA])
    broken = replace(tenant("alpha", "init_fails.wat", ["echo"], token=ALPHA.token), generation=2)
    server.sync([broken])
    status = server.shard.status("alpha")
    assert status is not None and status.loaded and status.reason == "ModuleRejected"
    assert "tw_init failed" in status.message and "still serving generation 0" in status.message
    assert server.invoke(ALPHA, "echo", b"old").body == b"old"
    # Fixed again: the new version loads.
    fixed = replace(ALPHA, generation=3, limits=replace(ALPHA.limits, timeout_ms=999))
    server.sync([fixed])
    assert server.shard.status("alpha").reason == LOADED  # type: ignore[union-attr]
    assert server.shard.served["alpha"].config.generation == 3


def test_the_tenant_spec_limits_reach_the_guest(runtime_server) -> None:  # noqa: F811
    small = tenant("small", "echo.wat", ["echo"], max_output_bytes=10)
    server = runtime_server([small])
    assert server.invoke(small, "echo", b"0123456789").body == b"0123456789"
    reply = server.invoke(small, "echo", b"0123456789!")
    assert reply.status == 500 and reply.json()["error"]["kind"] == "guest_limit_exceeded"
    assert reply.json()["error"]["limit"] == "maxOutputBytes"
