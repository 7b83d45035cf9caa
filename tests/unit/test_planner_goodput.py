"""Goodput from a measured latency-vs-load curve, and replicas with failure and rollout reserve."""

from __future__ import annotations

import json

import pytest

from tensorwasm.planner.errors import PlanInputError
from tensorwasm.planner.goodput import find_goodput, parse_curve, replicas

CURVE = [
    {"load": 100, "p95_ms": 20, "p99_ms": 40},
    {"load": 400, "p95_ms": 35, "p99_ms": 80},
    {"load": 800, "p95_ms": 60, "p99_ms": 180},
    {"load": 1200, "p95_ms": 90, "p99_ms": 400},
    {"load": 1600, "p95_ms": 300, "p99_ms": 900},
]


def test_goodput_is_highest_load_meeting_both_targets() -> None:
    points = parse_curve(json.dumps(CURVE), "curve.json")
    g = find_goodput(points, 0.100, 0.250, 0.01)
    assert g.goodput == 800  # 1200 meets p95 (90 ms) but misses p99 (400 ms > 250 ms)
    assert g.first_violation is not None and g.first_violation.load == 1200
    assert "p99" in g.violation
    assert find_goodput(points, 0.100, 1.0, 0.01).goodput == 1200
    assert find_goodput(points, 0.010, 1.0, 0.01).goodput == 0


def test_error_budget_and_unsorted_input() -> None:
    raw = [
        {"load": 200, "p95_ms": 5, "p99_ms": 9, "error_rate": 0.02},
        {"load": 100, "p95_ms": 4, "p99_ms": 8},
    ]
    g = find_goodput(parse_curve(json.dumps(raw), "c"), 0.1, 0.1, 0.01)
    assert g.goodput == 100 and "error rate" in g.violation


def test_curve_from_bench_figures_and_csv() -> None:
    figures = {"load_100_p95_ms": 10, "load_100_p99_ms": 20, "load_200_p95_us": 90000, "load_200_p99_ms": 95}
    bench = {"title": "load", "figures": figures}
    points = parse_curve(json.dumps(bench), "bench/results/load.json")
    assert [(p.load, p.p95_s) for p in points] == [(100, 0.010), (200, pytest.approx(0.090))]
    csv_points = parse_curve("load,p95_ms,p99_ms\n100,10,20\n300,30,60\n", "c.csv")
    assert csv_points[1].p99_s == pytest.approx(0.060)


def test_replicas_with_reserve() -> None:
    # usable = 800 * 0.9 = 720; steady = ceil(5000 / 720) = 7; + 1 failure + ceil(7 * 0.25) = 2 rollout = 10
    r = replicas(800, 5000, operating_margin=0.1, failure_reserve=1, rollout_surge=0.25)
    assert (r.steady, r.failure_reserve, r.rollout_reserve, r.total) == (7, 1, 2, 10)
    assert "= 10" in r.formula()
    with pytest.raises(PlanInputError, match="goodput is 0"):
        replicas(0, 100, operating_margin=0.1, failure_reserve=1, rollout_surge=0.25)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "no points"),
        ('[{"load": 1, "p95_ms": 2}]', r"p99_s.*required"),
        ('[{"load": -1, "p95_ms": 2, "p99_ms": 3}]', r"\[0\]\.load.*>= 0"),
        ('[{"load": "x", "p95_ms": 2, "p99_ms": 3}]', "not a number"),
        ("{nope", "not valid JSON"),
        ('{"figures": {"load_1_p95_ms": 3}}', "p95 and a p99"),
    ],
)
def test_bad_curves_name_the_field(text: str, message: str) -> None:
    with pytest.raises(PlanInputError, match=message):
        parse_curve(text, "curve.json")
