"""Kubernetes quantity strings ("256Mi", "1G", 1048576) to whole bytes.

Owns quantity parsing for the operator's models; pure, imports nothing beyond the standard library.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES = {
    "": 1,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
    "Ei": 1 << 60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
_PATTERN = re.compile(r"^\+?(?P<number>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[kMGTPE])?$")


def parse_bytes(field: str, value: object) -> int:
    """Whole bytes of a quantity; raises ValueError naming `field` for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"{field} must be a quantity such as 256Mi, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{field} must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a quantity such as 256Mi, got {value!r}")
    match = _PATTERN.match(value.strip())
    if match is None:
        raise ValueError(f"{field} must be a quantity such as 256Mi, got {value!r}")
    try:
        number = Decimal(match.group("number"))
    except InvalidOperation as exc:  # pragma: no cover - the pattern already excludes this
        raise ValueError(f"{field} must be a quantity such as 256Mi, got {value!r}") from exc
    scaled = number * _SUFFIXES[match.group("suffix") or ""]
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{field} must be a whole number of bytes, got {value!r}")
    return int(scaled)
