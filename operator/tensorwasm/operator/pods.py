"""What the operator reads off a shard pod, for the moves (moves.py) and the shard roll (roll.py).

Owns `pod_ready`: the one reading of a pod's readiness both use (a move starts only once its target
pod is Ready; the roll surges, drains and replaces only Ready pods). Pure: no I/O; must not import
kopf, kube/ or the operator's other modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def pod_ready(pod: Mapping[str, Any] | None) -> bool:
    """The pod exists, is not terminating, and its Ready condition is True (its readiness probe passed)."""
    if pod is None or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
