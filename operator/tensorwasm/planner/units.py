"""Parsing and printing of the planner's quantities: bytes, durations, rates, bandwidth, fractions.

Owns the rule that a byte size or a duration must carry a unit (``256`` is refused, ``256Mi`` is
not) and the sanity bounds that catch absurd values. Every parse error names the field. Must not
import the rest of the planner except `errors`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from tensorwasm.planner.errors import PlanInputError

KIB, MIB, GIB, TIB, PIB = (1 << 10), (1 << 20), (1 << 30), (1 << 40), (1 << 50)

_BYTE_UNITS: dict[str, float] = {
    "b": 1,
    "ki": KIB, "kib": KIB, "mi": MIB, "mib": MIB, "gi": GIB, "gib": GIB, "ti": TIB, "tib": TIB,
    "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
}  # fmt: skip
_SECOND_UNITS: dict[str, float] = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0,
}  # fmt: skip
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-zµ/%]*)\s*$")


def _split(field: str, text: str | int | float) -> tuple[float, str]:
    if isinstance(text, bool):
        raise PlanInputError(field, f"expected a quantity, got {text!r}")
    if isinstance(text, int | float):
        return float(text), ""
    raw = str(text).strip()
    if raw.startswith("-"):
        raise PlanInputError(field, f"must not be negative, got {raw!r}")
    match = _NUMBER_UNIT.match(raw)
    if not match:
        raise PlanInputError(field, f"cannot read {raw!r} as a number with an optional unit")
    return float(match.group(1)), match.group(2)


def parse_bytes(field: str, text: str | int | float, *, maximum: float = PIB, allow_zero: bool = True) -> int:
    """``"256Mi"`` -> 268435456. Binary (Ki, Mi, Gi, Ti) and decimal (k, M, G, T, with or without B)."""
    value, unit = _split(field, text)
    if not unit and value != 0:
        raise PlanInputError(field, f"{text!r} has no unit; write e.g. {text}Mi or {text}Gi")
    scale = _BYTE_UNITS.get(unit.lower()) if unit else 1
    if scale is None:
        raise PlanInputError(
            field, f"unknown byte unit {unit!r} in {text!r} (use Ki, Mi, Gi, Ti, KB, MB, GB, TB)"
        )
    result = math.ceil(value * scale)
    return int(_bounded(field, result, 0 if allow_zero else 1, maximum, format_bytes))


def parse_seconds(field: str, text: str | int | float, *, maximum: float = 3600.0) -> float:
    """``"2ms"`` -> 0.002. A duration needs a unit (ns, us, ms, s, min, h)."""
    value, unit = _split(field, text)
    if not unit and value != 0:
        raise PlanInputError(field, f"{text!r} has no unit; write e.g. {text}ms or {text}s")
    scale = _SECOND_UNITS.get(unit) if unit else 1.0
    if scale is None:
        raise PlanInputError(field, f"unknown time unit {unit!r} in {text!r} (use ns, us, ms, s, min, h)")
    return float(_bounded(field, value * scale, 0.0, maximum, lambda v: f"{v:g}s"))


def parse_bandwidth(field: str, text: str | int | float) -> float:
    """``"3.35TB/s"`` -> 3.35e12 bytes per second."""
    value, unit = _split(field, text)
    if not unit.lower().endswith("/s"):
        raise PlanInputError(field, f"{text!r} needs a bandwidth unit, e.g. 3.35TB/s or 900GB/s")
    scale = _BYTE_UNITS.get(unit[:-2].lower())
    if scale is None:
        raise PlanInputError(field, f"unknown byte unit in {text!r} (use GB/s, TB/s, GiB/s, ...)")
    return float(_bounded(field, value * scale, 1e6, 1e15, lambda v: f"{v / 1e9:g}GB/s"))


def parse_fraction(field: str, text: str | int | float, *, allow_zero: bool = False) -> float:
    """``"60%"`` or ``0.6`` -> 0.6; must lie in (0, 1] (or [0, 1] with allow_zero)."""
    value, unit = _split(field, text)
    if unit == "%":
        value /= 100.0
    elif unit:
        raise PlanInputError(field, f"{text!r} must be a fraction (0.6) or a percentage (60%)")
    if value > 1.0 or (value == 0 and not allow_zero):
        low = "0" if allow_zero else "above 0"
        raise PlanInputError(field, f"must be {low} and at most 1 (100%), got {text!r}")
    return value


def parse_number(
    field: str, text: str | int | float, *, minimum: float = 0.0, maximum: float = 1e12, integer: bool = False
) -> float:
    """A plain count or rate (tenants, requests per second); bounds catch absurd values."""
    value, unit = _split(field, text)
    if unit and unit.lower() not in ("/s", "rps", "qps"):
        raise PlanInputError(field, f"{text!r} must be a plain number")
    if integer and value != int(value):
        raise PlanInputError(field, f"must be a whole number, got {text!r}")
    return float(_bounded(field, value, minimum, maximum, lambda v: f"{v:g}"))


def _bounded(field: str, value: float, minimum: float, maximum: float, fmt: Callable[[float], str]) -> float:
    if not math.isfinite(value):
        raise PlanInputError(field, f"must be finite, got {value}")
    if value < minimum:
        raise PlanInputError(field, f"must be at least {fmt(minimum)}, got {fmt(value)}")
    if value > maximum:
        raise PlanInputError(field, f"{fmt(value)} is implausibly large (limit {fmt(maximum)})")
    return value


def format_bytes(value: float) -> str:
    """Binary units, one decimal where not whole: 1536 MiB -> '1.5Gi'."""
    for unit, scale in (("Pi", PIB), ("Ti", TIB), ("Gi", GIB), ("Mi", MIB), ("Ki", KIB)):
        if value >= scale:
            scaled = value / scale
            return f"{scaled:.0f}{unit}" if scaled == int(scaled) else f"{scaled:.1f}{unit}"
    return f"{value:.0f}B"


def format_seconds(value: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if value >= scale:
            return f"{value / scale:.4g}{unit}"
    return f"{value / 1e-9:.4g}ns"
