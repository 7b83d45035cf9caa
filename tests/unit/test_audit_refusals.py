"""Refused requests are audited per (tenant, kind) at most once a window, with the count of the
others (review N14): a tenant flooding refusals cannot wash the other tenants' records out of the
size-bounded log, and the total stays exact. An injected clock drives the windows (no sleeps)."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from tensorwasm.api.tenant import RateLimit
from tensorwasm.runtime.audit import AuditLog, AuditSettings, Record, RefusalWindows, format_record
from tests.runtime_fixtures import tenant
from tests.unit.test_runtime_jobs import shard_server  # noqa: F401 (the fixture)

DEADLINE_S = 60.0


class _Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _rec(tenant: str, outcome: str = "rate_limited", status: int = 429, rid: str = "r") -> Record:
    return (0.0, "invoke", rid, tenant, "token", "echo", "sync", status, outcome, None, 0, 0, "10.0.0.1", "")


def _stands_for(lines: list[dict[str, Any]], tenant: str, outcome: str) -> int:
    return sum(1 + r.get("suppressed", 0) for r in lines if r["tenant"] == tenant and r["outcome"] == outcome)


def test_a_flood_of_refusals_leaves_its_neighbours_lines_and_an_exact_count() -> None:
    clock = _Clock()
    out = io.StringIO()
    audit = AuditLog(AuditSettings(flush_s=0.0), stream=out, clock=clock).start()
    try:
        for i in range(10_000):  # tenant A: 10,000 refusals over 10 s (one per ms)
            clock.now += 0.001
            audit.refusal(_rec("a", rid=f"a-{i}"))
            if i % 100 == 0:  # B: an admitted invoke every 0.1 s and a refusal every 2.5 s
                audit.record((0.0, "invoke", f"b-{i}", "b", "token", "echo", "sync", 200, "ok",
                              0.001, 1, 1, "10.0.0.2", ""))  # fmt: skip
            if i % 2500 == 0:
                audit.refusal(_rec("b", "queue_full", rid=f"b-refused-{i}"))
    finally:
        audit.close(timeout_s=None)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    a_lines = [r for r in lines if r["tenant"] == "a"]
    assert _stands_for(lines, "a", "rate_limited") == 10_000  # nothing lost: every refusal counted
    assert len(a_lines) <= 12  # about one a second for 10 s, not 10,000
    b_ok = [r for r in lines if r["tenant"] == "b" and r["outcome"] == "ok"]
    assert len(b_ok) == 100 and "suppressed" not in b_ok[0]  # admitted requests: a line each
    b_refused = [r for r in lines if r["tenant"] == "b" and r["outcome"] == "queue_full"]
    assert [r["requestId"] for r in b_refused] == [f"b-refused-{i}" for i in range(0, 10_000, 2500)]
    assert all("suppressed" not in r for r in b_refused)  # rarer than a window: each its own line
    assert audit.dropped == 0


def test_a_window_writes_its_count_when_it_ends_without_a_next_refusal() -> None:
    clock = _Clock()
    windows = RefusalWindows(1.0, 16, clock)
    assert windows.note(_rec("a", rid="first")) == [(_rec("a", rid="first"), 0)]
    for i in range(5):
        clock.now += 0.125  # (binary fractions: the clock's sums stay exact)
        assert windows.note(_rec("a", rid=f"n{i}")) == []
    assert windows.due() == []  # the window is still open
    assert windows.wait_s() == 0.375
    clock.now += 0.375
    # The window's end: one line, the last counted refusal's, standing for all five.
    assert windows.due() == [(_rec("a", rid="n4"), 4)]
    clock.now += 0.5
    assert windows.note(_rec("a", rid="late")) == []  # within the window that line opened
    clock.now += 0.625
    # A refusal after an unflushed window carries its count (1) itself.
    assert windows.note(_rec("a", rid="next")) == [(_rec("a", rid="next"), 1)]
    clock.now += 1.0
    assert windows.due() == [] and len(windows) == 0  # nothing counted: the window just goes


def test_the_windows_are_bounded_and_a_closed_one_keeps_its_count() -> None:
    clock = _Clock()
    windows = RefusalWindows(1.0, 2, clock)
    lines = []
    for name in ("a", "a", "a", "b", "b", "c", "c", "d"):
        lines += windows.note(_rec(name, rid=name))
    lines += windows.due(everything=True)
    assert len(windows) == 0
    total = {name: sum(1 + n for rec, n in lines if rec[3] == name) for name in "abcd"}
    assert total == {"a": 3, "b": 2, "c": 2, "d": 1}


def test_the_line_says_how_many_it_stands_for() -> None:
    assert "suppressed" not in json.loads(format_record(_rec("a")))
    assert json.loads(format_record(_rec("a"), 41))["suppressed"] == 41


def test_the_shard_aggregates_its_refusals_and_audits_admitted_requests_each(
    shard_server: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    cfg = replace(tenant("alpha"), rate_limit=RateLimit(requests_per_second=1, burst=1))
    path = tmp_path / "audit.log"
    audit = AuditLog(AuditSettings(target=str(path), flush_s=0.01, refusal_window_s=3600)).start()
    try:
        server = shard_server([cfg], audit=audit)
        statuses = [server.invoke(cfg, "echo", b"x").status for _ in range(30)]
        refused = statuses.count(429)
        assert statuses[0] == 200 and refused >= 2, statuses
    finally:
        audit.close(timeout_s=None)  # closes the open window: its count is written
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert _stands_for(lines, "alpha", "rate_limited") == refused
    assert len([r for r in lines if r["outcome"] == "rate_limited"]) == 2  # the first, then the count
    assert len([r for r in lines if r["outcome"] == "ok"]) == statuses.count(200)
