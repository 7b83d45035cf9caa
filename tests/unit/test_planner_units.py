"""Planner quantities: units are required where they matter, absurd values are refused by name."""

from __future__ import annotations

import pytest

from tensorwasm.planner.errors import PlanInputError
from tensorwasm.planner.units import (
    format_bytes,
    parse_bandwidth,
    parse_bytes,
    parse_fraction,
    parse_number,
    parse_seconds,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("256Mi", 256 << 20), ("1.5Gi", 3 << 29), ("24GB", 24_000_000_000), ("64MiB", 64 << 20), ("0", 0)],
)
def test_bytes(text: str, expected: int) -> None:
    assert parse_bytes("--x", text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("256", "has no unit"),
        ("-1Gi", "negative"),
        ("12Qb", "unknown byte unit"),
        ("2000Ti", "implausibly large"),
    ],
)
def test_bad_bytes_name_the_field(text: str, message: str) -> None:
    with pytest.raises(PlanInputError, match=message) as info:
        parse_bytes("--working-set", text)
    assert info.value.field == "--working-set"
    assert str(info.value).startswith("--working-set:")


def test_seconds_bandwidth_fraction_number() -> None:
    assert parse_seconds("--t", "2ms") == pytest.approx(0.002)
    assert parse_seconds("--t", "500us") == pytest.approx(0.0005)
    assert parse_bandwidth("--b", "3.35TB/s") == pytest.approx(3.35e12)
    assert parse_fraction("--f", "60%") == pytest.approx(0.6)
    assert parse_fraction("--f", "0.6") == pytest.approx(0.6)
    assert parse_number("--n", "1000") == 1000
    with pytest.raises(PlanInputError, match="no unit"):
        parse_seconds("--cpu-per-request", "2")
    with pytest.raises(PlanInputError, match="bandwidth unit"):
        parse_bandwidth("--bandwidth", "3.35")
    with pytest.raises(PlanInputError, match="at most 1"):
        parse_fraction("--target-utilisation", "150%")
    with pytest.raises(PlanInputError, match="above 0"):
        parse_fraction("--target-utilisation", "0")
    with pytest.raises(PlanInputError, match="whole number"):
        parse_number("--tenants", "2.5", integer=True)
    with pytest.raises(PlanInputError, match="cannot read"):
        parse_number("--tenants", "lots")


def test_format_bytes() -> None:
    assert format_bytes(3 << 29) == "1.5Gi"
    assert format_bytes(64 << 20) == "64Mi"
    assert format_bytes(12) == "12B"
