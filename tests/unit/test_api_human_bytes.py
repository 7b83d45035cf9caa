"""What kubectl shows: GPU-USED in human units, and the CRD's quantity spelling rule equal to the parser's."""

from __future__ import annotations

import re

import pytest

from tensorwasm.api.conditions import human_bytes
from tensorwasm.api.fields import CEL_QUANTITY_PATTERN
from tensorwasm.api.quantity import QUANTITY_PATTERN


@pytest.mark.parametrize(
    ("count", "shown"),
    [(0, "0"), (512, "512"), (1023, "1023"), (1024, "1Ki"), (1536, "1.5Ki"), (12 << 20, "12Mi"),
     ((3 << 30) + 1, "3Gi"), (5 << 50, "5Pi")],
)  # fmt: skip
def test_bytes_read_as_people_read_them(count: int, shown: str) -> None:
    assert human_bytes(count) == shown


SPELLINGS = ["1", "+1", "1.5Ki", ".5", "1.", "256Mi", "12XB", "-1Gi", "1e3", "1m", "", "Mi"]


@pytest.mark.parametrize("text", SPELLINGS)
def test_the_crd_rule_spells_quantities_as_the_parser_does(text: str) -> None:
    assert "\\" not in CEL_QUANTITY_PATTERN  # a CEL string literal would need them doubled
    assert bool(re.match(CEL_QUANTITY_PATTERN, text)) == bool(re.match(QUANTITY_PATTERN, text))
