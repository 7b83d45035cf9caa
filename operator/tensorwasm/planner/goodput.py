"""Goodput: the highest load a replica sustains within its p95/p99 targets, and the replicas needed.

Owns reading a measured latency-versus-load curve (points from a benchmark) and the reserve maths:
  goodput  = highest measured load L such that every point at or below L meets p95, p99 (and the
             error budget) -- no interpolation past a measured point
  usable   = goodput * (1 - operating_margin)        (stay below the saturation knee)
  steady   = ceil(peak_load / usable)
  total    = steady + failure_reserve + ceil(steady * rollout_surge)
Pure apart from `parse_curve`, which reads the text it is given; must not import matplotlib or the CLI.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from tensorwasm.planner.errors import PlanInputError


@dataclass(frozen=True)
class CurvePoint:
    load: float  # offered requests per second
    p95_s: float
    p99_s: float
    error_rate: float = 0.0


_FIGURE_POINT = re.compile(r"^load_([0-9.]+)_(p95|p99|error_rate)(?:_(us|ms|s))?$")
_SCALE = {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}


def _point(field: str, raw: dict[str, Any]) -> CurvePoint:
    def number(key: str, *aliases: str, default: float | None = None, scale: float = 1.0) -> float:
        for name in (key, *aliases):
            if name in raw and raw[name] not in (None, ""):
                try:
                    value = float(raw[name]) * scale
                except (TypeError, ValueError):
                    raise PlanInputError(f"{field}.{name}", f"not a number: {raw[name]!r}") from None
                if value < 0 or not math.isfinite(value):
                    raise PlanInputError(
                        f"{field}.{name}", f"must be a finite number >= 0, got {raw[name]!r}"
                    )
                return value
        if default is None:
            raise PlanInputError(f"{field}.{key}", "is required")
        return default

    p95 = number("p95_ms", scale=1e-3) if "p95_ms" in raw else number("p95_s", "p95_seconds")
    p99 = number("p99_ms", scale=1e-3) if "p99_ms" in raw else number("p99_s", "p99_seconds")
    return CurvePoint(
        load=number("load", "rps", "qps", "offered_rps"),
        p95_s=p95,
        p99_s=p99,
        error_rate=number("error_rate", default=0.0),
    )


def parse_curve(text: str, source: str) -> tuple[CurvePoint, ...]:
    """A curve from CSV or JSON (a list of points, or a bench result: "curve" or load_<N>_p95_ms figures)."""
    stripped = text.lstrip()
    points: list[CurvePoint] = []
    if stripped.startswith(("{", "[")):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanInputError(source, f"not valid JSON: {exc}") from exc
        if isinstance(doc, dict) and isinstance(doc.get("curve"), list):
            doc = doc["curve"]
        if isinstance(doc, list):
            for n, raw in enumerate(doc):
                if not isinstance(raw, dict):
                    raise PlanInputError(f"{source}[{n}]", "each point must be an object")
                points.append(_point(f"{source}[{n}]", raw))
        elif isinstance(doc, dict) and isinstance(doc.get("figures"), dict):
            points = _from_figures(doc["figures"], source)
        else:
            raise PlanInputError(source, 'expected a list of points, or an object with "curve" or "figures"')
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
        points = [_point(f"{source}:{n + 2}", dict(row)) for n, row in enumerate(rows)]
    if len(points) < 1:
        raise PlanInputError(source, "the curve has no points")
    points.sort(key=lambda p: p.load)
    return tuple(points)


def _from_figures(figures: dict[str, Any], source: str) -> list[CurvePoint]:
    by_load: dict[float, dict[str, float]] = {}
    for name, value in figures.items():
        match = _FIGURE_POINT.match(name)
        if match and isinstance(value, int | float):
            load, metric, unit = float(match.group(1)), match.group(2), match.group(3)
            by_load.setdefault(load, {})[metric] = float(value) * (
                _SCALE[unit] if metric != "error_rate" else 1
            )
    points = []
    for load, metrics in sorted(by_load.items()):
        if "p95" not in metrics or "p99" not in metrics:
            raise PlanInputError(f"{source}: load_{load:g}", "needs both a p95 and a p99 figure")
        points.append(CurvePoint(load, metrics["p95"], metrics["p99"], metrics.get("error_rate", 0.0)))
    if not points:
        raise PlanInputError(source, "no load_<N>_p95_ms / load_<N>_p99_ms figures")
    return points


@dataclass(frozen=True)
class Goodput:
    points: tuple[CurvePoint, ...]
    p95_target_s: float
    p99_target_s: float
    error_budget: float
    goodput: float  # 0 when even the lightest load misses a target
    first_violation: CurvePoint | None
    violation: str

    def to_json(self) -> dict[str, Any]:
        return {
            "targets": {
                "p95Seconds": self.p95_target_s,
                "p99Seconds": self.p99_target_s,
                "errorRate": self.error_budget,
            },
            "goodputPerReplica": self.goodput,
            "firstViolation": None
            if self.first_violation is None
            else {"load": self.first_violation.load, "why": self.violation},
            "points": [
                {"load": p.load, "p95Seconds": p.p95_s, "p99Seconds": p.p99_s, "errorRate": p.error_rate}
                for p in self.points
            ],
            "source": "measured",
        }


def find_goodput(points: tuple[CurvePoint, ...], p95_s: float, p99_s: float, error_budget: float) -> Goodput:
    best = 0.0
    for p in points:
        why = ""
        if p.p95_s > p95_s:
            why = f"p95 {p.p95_s * 1e3:g} ms > {p95_s * 1e3:g} ms"
        elif p.p99_s > p99_s:
            why = f"p99 {p.p99_s * 1e3:g} ms > {p99_s * 1e3:g} ms"
        elif p.error_rate > error_budget:
            why = f"error rate {p.error_rate:.2%} > {error_budget:.2%}"
        if why:
            return Goodput(points, p95_s, p99_s, error_budget, best, p, f"at {p.load:g} req/s {why}")
        best = p.load
    return Goodput(points, p95_s, p99_s, error_budget, best, None, "")


@dataclass(frozen=True)
class Replicas:
    peak_load: float
    usable_per_replica: float
    operating_margin: float
    steady: int
    failure_reserve: int
    rollout_reserve: int

    @property
    def total(self) -> int:
        return self.steady + self.failure_reserve + self.rollout_reserve

    def formula(self) -> str:
        return (
            f"steady = ceil({self.peak_load:g} / {self.usable_per_replica:g}) = {self.steady}; "
            f"total = {self.steady} + {self.failure_reserve} failure"
            f" + {self.rollout_reserve} rollout = {self.total}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "peakLoad": self.peak_load,
            "operatingMargin": self.operating_margin,
            "usablePerReplica": self.usable_per_replica,
            "steady": self.steady,
            "failureReserve": self.failure_reserve,
            "rolloutReserve": self.rollout_reserve,
            "total": self.total,
            "formula": self.formula(),
            "source": "modeled",
        }


def replicas(
    goodput: float, peak_load: float, *, operating_margin: float, failure_reserve: int, rollout_surge: float
) -> Replicas:
    if goodput <= 0:
        raise PlanInputError(
            "--p95/--p99", "no measured load meets the targets: goodput is 0, no replica count works"
        )
    usable = goodput * (1 - operating_margin)
    steady = max(1, math.ceil(round(peak_load / usable, 9)))
    return Replicas(
        peak_load, usable, operating_margin, steady, failure_reserve, math.ceil(steady * rollout_surge)
    )
