"""Kubernetes byte quantities ("256Mi", "1.5Gi", "500k", 1048576) to whole bytes.

Owns the one parser every reader of a Tenant uses (the spec models, operator settings, the runtime's
local tenants file), so a quantity means the same bytes everywhere, and the pattern the CRD declares
for the same spellings. Pure; standard library only.
"""

from __future__ import annotations

import re
from decimal import Decimal

SUFFIXES = {
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
# The API server's own quantity pattern: the CRD declares it, the parser below follows it.
QUANTITY_PATTERN = r"^(\+)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[kMGTPE])?$"
_PATTERN = re.compile(r"^\+?(?P<number>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[kMGTPE])?$")


def quantity_bytes(value: object) -> int:
    """Whole bytes of a quantity; ValueError says why not, without naming a field (callers do)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be a quantity such as 256Mi, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value
    match = _PATTERN.fullmatch(value)  # fullmatch: Python's $ would let a trailing newline through
    if match is None:
        raise ValueError(f"must be a quantity such as 256Mi, got {value!r}")
    scaled = Decimal(match.group("number")) * SUFFIXES[match.group("suffix") or ""]
    if scaled != scaled.to_integral_value():
        raise ValueError(f"must be a whole number of bytes, got {value!r}")
    return int(scaled)


def format_quantity(value: int) -> str:
    """The shortest exact spelling of whole bytes with a binary suffix ("64Mi"; "1000" stays "1000")."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        if value and value % SUFFIXES[suffix] == 0:
            return f"{value // SUFFIXES[suffix]}{suffix}"
    return str(value)
