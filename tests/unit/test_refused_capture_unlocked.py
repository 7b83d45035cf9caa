"""Review R3 K8: a refused tenant's state is captured in its own task, one capture at a time, outside
Shard.sync's lock. While a refused tenant's capture is held, the next sync (a new tenant placed here)
completes and the new tenant serves; the refused tenant stops serving at once, and when its spec is
fixed before the capture ends, it comes back in its state (its load waits for the capture). A real
shard (CPU backend) serving the counter fixture, whose total lives in a GPU buffer."""

# ruff: noqa: F811  (pytest fixtures are imported by name and taken as parameters)
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.runtime.shard import ASLEEP, LOADED, TenantStatus
from tensorwasm.runtime.sleep import Sleeper
from tensorwasm.runtime.snapshots.store import SnapshotStore
from tests.runtime_fixtures import RuntimeServer, runtime_server  # noqa: F401
from tests.unit.test_runtime_sleep import add, counter, reason, wait_for

INVALID = TenantStatus(False, "InvalidSpec", "spec.limits: made invalid", 1)


def test_a_held_capture_of_a_refused_tenant_holds_up_no_sync_and_keeps_its_state(
    runtime_server: Callable[..., RuntimeServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alpha, beta, gamma = (
        counter("alpha", after="1h"),
        counter("beta", after="1h"),
        counter("gamma", after="1h"),
    )
    server = runtime_server([alpha, beta], sleep_store=SnapshotStore(tmp_path / "store"))
    assert add(server, alpha, 5) == 5 and add(server, beta, 9) == 9
    capturing, release = threading.Event(), threading.Event()
    real = Sleeper.try_sleep

    def held(self: Sleeper, reason_: str) -> Any:
        if reason_ == "refused":
            capturing.set()
            assert release.wait(60), "the test never released the capture"
        return real(self, reason_)

    monkeypatch.setattr(Sleeper, "try_sleep", held)
    try:
        server.run(server.shard.sync([beta], {"alpha": INVALID, "beta2": INVALID}, wait=False))
        wait_for(capturing.is_set)
        assert server.invoke(alpha, "add").status == 401  # refused: it stops serving at once
        # The capture is held: a new placement still syncs and serves (the lock is free).
        server.run(server.shard.sync([beta, gamma], {"alpha": INVALID}), timeout=30)
        assert reason(server, "gamma") == LOADED and add(server, gamma, 2) == 2
        assert add(server, beta, 1) == 10
        # Alpha's spec is fixed while its capture is still held: its load waits for the capture.
        server.run(server.shard.sync([alpha, beta, gamma], wait=False))
        assert "alpha" not in server.shard.served
    finally:
        release.set()
    server.run(server.shard.settled())
    assert reason(server, "alpha") == ASLEEP  # loaded from the record the capture wrote
    assert add(server, alpha, 1) == 6  # its state kept


def test_a_tenant_deleted_while_its_refusal_is_captured_loses_its_snapshot_once_written(
    runtime_server: Callable[..., RuntimeServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    server = runtime_server([alpha], sleep_store=SnapshotStore(store))
    assert add(server, alpha, 5) == 5
    capturing, release = threading.Event(), threading.Event()
    real = Sleeper.try_sleep

    def held(self: Sleeper, reason_: str) -> Any:
        if reason_ == "refused":
            capturing.set()
            assert release.wait(60), "the test never released the capture"
        return real(self, reason_)

    monkeypatch.setattr(Sleeper, "try_sleep", held)
    try:
        server.run(server.shard.sync([], {"alpha": INVALID}, wait=False))
        wait_for(capturing.is_set)
        server.run(server.shard.sync([], deleted={"alpha"}), timeout=30)  # deleted: not held up either
    finally:
        release.set()
    server.run(server.shard.settled())
    assert [p.name for p in (store / "tenants").iterdir()] == ["uid-alpha.sleep"]  # it was captured,
    assert not list((store / "sleeping").glob("*.json"))  # then the record went with it
    assert not [p for p in (store / "tenants").rglob("*") if p.is_file()]  # and the blob
