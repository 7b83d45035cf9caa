"""Kubernetes quantity strings ("256Mi", "1G", 1048576) to whole bytes.

Names the field in quantity errors for the operator's models; the parsing is tensorwasm.quantity's.
"""

from __future__ import annotations

from tensorwasm.quantity import quantity_bytes


def parse_bytes(field: str, value: object) -> int:
    """Whole bytes of a quantity; raises ValueError naming `field` for anything else."""
    try:
        return quantity_bytes(value)
    except ValueError as exc:
        raise ValueError(f"{field} {exc}") from None
