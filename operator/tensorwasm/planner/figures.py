"""The planner's output vocabulary: figures tagged measured or modeled, and formulas with their terms.

Owns `Figure` (a number, its unit, whether a benchmark measured it or the model assumed it, and
where it came from) and `Formula` (an expression, its terms filled in, the result against what the
SKU offers). Pure data; must not import matplotlib, yaml or the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Source = Literal["measured", "modeled"]


@dataclass(frozen=True)
class Figure:
    """One number the plan uses or produces."""

    value: float
    unit: str
    source: Source
    origin: (
        str  # "default (seeds' capacity model)", "--cpu-per-request", "bench/results/x.json:invoke_cpu_us"
    )

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit, "source": self.source, "origin": self.origin}


def modeled(value: float, unit: str, origin: str) -> Figure:
    return Figure(value, unit, "modeled", origin)


def combined_source(*figures: Figure) -> Source:
    """A derived figure is measured only if every term it rests on is."""
    return "measured" if figures and all(f.source == "measured" for f in figures) else "modeled"


@dataclass(frozen=True)
class Formula:
    """A sizing formula evaluated for one SKU: required vs available, and the headroom between them."""

    resource: str  # "memory", "gpuMemory", "cpu", "diskIops"
    expression: str  # symbolic, e.g. "2 * (instances * working_set + snapshot_buffer + runtime)"
    substituted: str  # the same with the numbers filled in
    terms: dict[str, Figure]
    required: Figure
    available: Figure
    notes: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        return self.required.value <= self.available.value

    @property
    def utilisation(self) -> float:
        """required / available; above 1.0 the resource does not fit."""
        if self.available.value <= 0:
            return math_inf() if self.required.value > 0 else 0.0
        return self.required.value / self.available.value

    @property
    def headroom(self) -> float:
        return self.available.value - self.required.value

    def to_json(self) -> dict[str, Any]:
        return {
            "resource": self.resource,
            "expression": self.expression,
            "substituted": self.substituted,
            "terms": {name: term.to_json() for name, term in self.terms.items()},
            "required": self.required.to_json(),
            "available": self.available.to_json(),
            "headroom": self.headroom,
            "utilisation": round(self.utilisation, 4) if self.utilisation != math_inf() else None,
            "fits": self.fits,
            "notes": list(self.notes),
        }


def math_inf() -> float:
    return float("inf")
