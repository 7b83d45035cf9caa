"""Prewarm (spec.idle.prewarm: history): a sleeper is woken ahead of its daily arrival pattern, into
free GPU room only, within the shard's prewarm budget; hits and misses are counted.

The predictor is pure (tenancy/prewarm.py, times given); the shard tests use a real shard on the CPU
backend with its wall clock in the test's hand, and tests/fixtures/counter.wat tenants, whose total
shows that a prewarmed tenant kept its state.
"""

# ruff: noqa: F811  (pytest fixtures are imported by name and taken as parameters)
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.runtime import metrics
from tensorwasm.runtime.shard import ASLEEP, LOADED
from tensorwasm.runtime.sleep import SleepRecords
from tensorwasm.runtime.snapshots.store import SnapshotStore
from tensorwasm.runtime.tenancy.config import TenantConfig
from tensorwasm.runtime.tenancy.prewarm import LEAD_S, SLOT_S, ArrivalHistory, Candidate, choose, due
from tests.conftest import wait_for
from tests.runtime_fixtures import RuntimeServer, runtime_server  # noqa: F401
from tests.unit.test_runtime_sleep import CAP, add, counter, open_devices, reason

DAY = 86_400.0
NINE = 20 * DAY + 9 * 3600  # 09:00 UTC on some day 20


def prewarms(outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("tensorwasm_tenant_prewarms_total", {"outcome": outcome}) or 0.0


# --- the predictor ---


def test_a_slot_used_on_most_of_the_last_days_is_predicted_and_others_are_not() -> None:
    history = ArrivalHistory()
    for day in range(3):
        history.record(NINE + day * DAY + 42)
    assert history.probability(NINE + 3 * DAY) == 1.0  # 09:00-09:05 on each of the 3 days seen
    assert history.probability(NINE + 3 * DAY + SLOT_S) == 0.0  # the next slot: never used
    assert history.probability(NINE + 3 * DAY - 12 * 3600) == 0.0
    young = ArrivalHistory()
    young.record(NINE)
    assert young.probability(NINE + DAY) == 0.0  # one day seen is a coincidence, not a pattern
    sparse = ArrivalHistory()
    sparse.record(NINE - 3 * DAY + 3600)  # first seen three days before, at 10:00
    sparse.record(NINE)
    assert sparse.probability(NINE + DAY) == 0.25  # 1 of the 4 days seen: below the threshold
    assert due(Candidate("s", sparse), NINE + DAY) is None


def test_a_tenant_is_due_one_lead_before_its_slot_and_once_per_slot() -> None:
    history = ArrivalHistory()
    for day in range(2):
        history.record(NINE + day * DAY)
    before = NINE + 2 * DAY - LEAD_S / 2  # 08:59:30: the 09:00 slot starts within the lead
    found = due(Candidate("a", history), before)
    assert found is not None and found[0] == 1.0
    assert due(Candidate("a", history), NINE + 2 * DAY - 2 * LEAD_S) is None  # too early
    assert due(Candidate("a", history, (found[1],)), NINE + 2 * DAY + 10) is None  # already for this slot


def test_two_adjacent_predicted_slots_do_not_take_turns() -> None:
    # Review R2 G4: slots S and S+1 both predicted; in S's last LEAD_S each unused prewarm (slept
    # again after idle.after) made the other slot due again: S, S+1, S, S+1, ... one wake per idle.after.
    history = ArrivalHistory()
    for day in range(3):
        history.record(NINE + day * DAY + 10)
        history.record(NINE + day * DAY + SLOT_S + 10)
    now = NINE + 3 * DAY + SLOT_S - 50  # in the 09:00 slot, 50 s before the 09:05 one
    done: list[tuple[int, int]] = []
    for i in range(6):  # each round: prewarmed, not called, asleep again 10 s later
        picked = choose([Candidate("t", history, tuple(done))], now + 10 * i, 4)
        done += [slot for _, slot in picked]
    assert [slot for _, slot in done] == [108, 109]  # one wake per slot, then none


def test_choose_keeps_to_the_budget_most_likely_first() -> None:
    sure, likely = ArrivalHistory(), ArrivalHistory()
    for day in range(4):
        sure.record(NINE + day * DAY)
        likely.record(NINE + day * DAY if day != 1 else NINE + day * DAY - 7200)
    now = NINE + 4 * DAY
    candidates = [Candidate("likely", likely), Candidate("sure", sure)]
    assert [n for n, _ in choose(candidates, now, 1)] == ["sure"]
    assert [n for n, _ in choose(candidates, now, 5)] == ["sure", "likely"]
    assert choose(candidates, now, 0) == []


# --- a real shard ---


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def prewarmed(server: RuntimeServer) -> set[str]:
    """Tenants awake on a prediction and not yet called."""
    return {n for n, t in server.shard.served.items() if t.sleeper and t.sleeper.prewarmed and not t.asleep}


def prewarmer(name: str, **limits: Any) -> TenantConfig:
    return replace(counter(name, after="1h", **limits), idle_prewarm="history")


def shard_with(
    runtime_server: Callable[..., RuntimeServer], tmp_path: Path, clock: Clock, **options: Any
) -> RuntimeServer:
    return runtime_server([], sleep_store=SnapshotStore(tmp_path / "store"), wall_clock=clock, **options)


def called_at_nine(server: RuntimeServer, clock: Clock, *configs: TenantConfig, days: int = 2) -> None:
    """Each tenant is called once at 09:00 on `days` days, then put to sleep."""
    for day in range(days):
        clock.t = NINE + day * DAY + 1
        for cfg in configs:
            add(server, cfg)
    for cfg in configs:
        assert server.run(server.shard.sleep(cfg.name))


def test_a_sleeper_is_woken_before_its_slot_and_its_request_is_a_hit(runtime_server, tmp_path) -> None:
    clock = Clock(NINE)
    early, plain = prewarmer("early"), counter("plain", after="1h")  # plain: prewarm off
    server = shard_with(runtime_server, tmp_path, clock)
    server.sync([early, plain])
    called_at_nine(server, clock, early, plain)
    clock.t = NINE + 2 * DAY - 30  # 08:59:30 on the third day
    server.run(server.shard.prewarm())  # (the shard's idle scan may have done it first on a slow box)
    assert reason(server, "early") == LOADED and "early" in open_devices(server)
    assert prewarmed(server) == {"early"}
    assert reason(server, "plain") == ASLEEP  # same calls, but it did not ask for prewarm
    hits = prewarms("hit")
    assert add(server, early, 0) == 2  # awake in its own state: both earlier calls counted
    assert prewarms("hit") == hits + 1
    assert server.run(server.shard.prewarm()) == []  # nothing more is due


def test_a_prewarm_never_puts_another_tenant_to_sleep(runtime_server, tmp_path) -> None:
    clock = Clock(NINE)
    early, resident = prewarmer("early"), counter("resident", after="1h")
    server = shard_with(runtime_server, tmp_path, clock, resident_gpu_bytes=CAP)
    server.sync([early])
    called_at_nine(server, clock, early)
    server.sync([early, resident])  # resident holds the only room now, idle
    add(server, resident)
    clock.t = NINE + 2 * DAY + 5
    assert server.run(server.shard.prewarm()) == []
    assert reason(server, "resident") == LOADED and set(open_devices(server)) == {"resident"}
    assert reason(server, "early") == ASLEEP
    assert add(server, early, 0) == 2  # a real request still wakes it (evicting the idle resident)
    assert reason(server, "resident") == ASLEEP


def test_the_prewarm_budget_and_an_unused_prewarm_is_a_miss(runtime_server, tmp_path) -> None:
    clock = Clock(NINE)
    a, b = prewarmer("a"), prewarmer("b")
    server = shard_with(runtime_server, tmp_path, clock, prewarm_tenants=1)
    server.sync([a, b])
    called_at_nine(server, clock, a, b)
    clock.t = NINE + 2 * DAY + 5
    server.run(server.shard.prewarm())
    assert server.run(server.shard.prewarm()) == []  # the budget is one
    woken = prewarmed(server)
    assert len(woken) == 1
    (first,) = woken
    other = "b" if first == "a" else "a"
    assert reason(server, other) == ASLEEP
    misses = prewarms("miss")
    assert server.run(server.shard.sleep(first))  # its idle.after passed without a request
    assert prewarms("miss") == misses + 1
    # The budget is free again: the other one is woken; the first is not woken twice for one slot.
    server.run(server.shard.prewarm())
    assert prewarmed(server) == {other} and reason(server, first) == ASLEEP


def test_both_sources_carry_idle_prewarm_and_refuse_an_unknown_mode(tmp_path: Path) -> None:
    from tensorwasm.api.fields import InvalidSpec
    from tensorwasm.runtime.tenancy.config import parse_local_tenant

    entry = {"name": "alpha", "token": "s3cret-alpha", "functions": ["echo"],
             "module": {"path": "echo.wat", "sha256": "a" * 64}}  # fmt: skip
    on = parse_local_tenant({**entry, "idle": {"after": "5m", "prewarm": "history"}}, "tenants[0]", tmp_path)
    assert on.idle_prewarm == "history" and on.idle_after == "5m"
    assert parse_local_tenant(entry, "tenants[0]", tmp_path).idle_prewarm is None
    none = parse_local_tenant({**entry, "idle": {"prewarm": "none"}}, "tenants[0]", tmp_path)
    assert none.idle_prewarm == "none"  # the same as absent: never prewarmed
    with pytest.raises(InvalidSpec, match="prewarm"):
        parse_local_tenant({**entry, "idle": {"prewarm": "always"}}, "tenants[0]", tmp_path)


def test_the_prewarm_budget_is_a_shard_setting_with_a_bound(tmp_path: Path) -> None:
    from tensorwasm.runtime.settings import SettingsError, load_settings

    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants: []\n")
    base = ["--tenants-file", str(tenants)]
    assert load_settings(base, {}).prewarm_tenants == 4
    assert load_settings([*base, "--prewarm-tenants", "0"], {}).prewarm_tenants == 0  # off
    assert load_settings(base, {"TENSORWASM_RUNTIME_PREWARM_TENANTS": "9"}).prewarm_tenants == 9
    with pytest.raises(SettingsError, match="--prewarm-tenants"):
        load_settings([*base, "--prewarm-tenants", "-1"], {})


def test_an_unused_prewarm_sleeps_back_into_its_blob_without_a_capture(runtime_server, tmp_path) -> None:
    clock = Clock(NINE)
    early = prewarmer("early")
    server = shard_with(runtime_server, tmp_path, clock)
    server.sync([early])
    called_at_nine(server, clock, early)
    sleeper = server.shard.served["early"].sleeper
    assert sleeper is not None
    digest, blobs = sleeper.digest, tmp_path / "store" / "tenants" / sleeper.key
    assert [p.name for p in blobs.glob("*.twsnap")] == [f"{digest}.twsnap"]
    clock.t = NINE + 2 * DAY + 5
    server.run(server.shard.prewarm())
    assert prewarmed(server) == {"early"}
    misses = prewarms("miss")
    assert server.run(server.shard.sleep("early"))
    assert prewarms("miss") == misses + 1 and reason(server, "early") == ASLEEP
    # The same blob, and no other written: the state it woke from is the state it sleeps in.
    assert sleeper.digest == digest and [p.name for p in blobs.glob("*.twsnap")] == [f"{digest}.twsnap"]
    record = SleepRecords(SnapshotStore(tmp_path / "store")).read(sleeper.key)
    assert record is not None and record.digest == digest
    assert add(server, early, 0) == 2  # and it wakes from it with both calls counted


def test_the_shards_idle_scan_prewarms_on_its_own(runtime_server, tmp_path) -> None:
    clock = Clock(NINE)
    early = prewarmer("early")
    quick = counter("quick", after="200ms")  # its idle.after makes the scan look every 50 ms
    server = shard_with(runtime_server, tmp_path, clock)
    server.sync([early, quick])
    called_at_nine(server, clock, early)
    assert reason(server, "early") == ASLEEP
    clock.t = NINE + 2 * DAY - 30  # nobody calls prewarm(): the scan does
    wait_for(lambda: prewarmed(server) == {"early"}, 60, "the idle scan to prewarm early")
    assert add(server, early, 0) == 2


def test_a_sleeper_remembers_its_prewarmed_slots_across_adjacent_predictions(
    runtime_server, tmp_path
) -> None:
    clock = Clock(NINE)
    early = prewarmer("early")
    server = shard_with(runtime_server, tmp_path, clock)
    server.sync([early])
    for day in range(2):  # called at 09:00 and at 09:05 on two days: both slots predicted
        for at in (1, SLOT_S + 1):
            clock.t = NINE + day * DAY + at
            add(server, early)
    assert server.run(server.shard.sleep("early"))
    woken = prewarms("woken")
    clock.t = NINE + 2 * DAY + SLOT_S - 50  # 09:04:10 on the third day
    for _ in range(4):  # prewarmed, never called, asleep again after its idle.after
        server.run(server.shard.prewarm())
        server.run(server.shard.sleep("early"))
        clock.t += 10
    assert prewarms("woken") == woken + 2  # the 09:00 slot and the 09:05 slot, once each
    assert add(server, early, 0) == 4  # and its state is intact
