"""Status maths: a Tenant's phase and conditions from the spec check, the placement and the shard's report.

Owns the Placed / ModuleReady / Ready conditions, their reasons (CamelCase constants), phase, the
merge that moves lastTransitionTime only on a flip, and message truncation. The operator writes
with it and a shard pre-writes the readiness its report implies with the same maths, so the two
agree on every field. Pure: no clock (callers pass `now`); imports only tensorwasm.api.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tensorwasm.api.tenant import Tenant

PLACED, MODULE_READY, READY = "Placed", "ModuleReady", "Ready"
# Condition and report messages are cut here: a module's error text can be long, a status is not a log.
MESSAGE_LIMIT = 1024

# Phases
PENDING, PHASE_PLACED, PHASE_READY, DEGRADED, FAILED = "Pending", "Placed", "Ready", "Degraded", "Failed"
PHASE_ASLEEP = "Asleep"  # served, sleeping in a snapshot (the shard's report reason ASLEEP)

# Reasons
INVALID_SPEC = "InvalidSpec"
INSUFFICIENT_CAPACITY = "InsufficientCapacity"
NO_SHARDS = "NoShards"
SCHEDULED = "Scheduled"
AWAITING_SHARD = "AwaitingShard"
MODULE_LOADED = "ModuleLoaded"
SHARD_FAILED = "ShardFailed"
SERVING = "Serving"
NOT_PLACED = "NotPlaced"
ASLEEP = "Asleep"  # status.runtime.reason of a sleeping tenant (runtime/sleep.py)


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str


@dataclass(frozen=True)
class Placement:
    """Where the tenant is, as far as status goes: a shard pod name or why there is none."""

    shard: str | None
    reason: str = SCHEDULED
    message: str = ""


def tenant_phase(tenant: Tenant, placement: Placement) -> tuple[str, list[Condition]]:
    """Phase and the three conditions, from what the operator knows now."""
    if tenant.spec_error is not None:
        msg = tenant.spec_error
        return FAILED, [
            Condition(PLACED, "False", INVALID_SPEC, msg),
            Condition(MODULE_READY, "False", INVALID_SPEC, msg),
            Condition(READY, "False", INVALID_SPEC, msg),
        ]
    if placement.shard is None:
        msg = placement.message
        return PENDING, [
            Condition(PLACED, "False", placement.reason, msg),
            Condition(MODULE_READY, "Unknown", NOT_PLACED, "the tenant is not placed on a shard"),
            Condition(READY, "False", placement.reason, msg),
        ]
    placed = Condition(PLACED, "True", SCHEDULED, f"placed on shard {placement.shard}")
    report = tenant.runtime
    if report is None or report.shard != placement.shard or report.observed_generation < tenant.generation:
        wait = f"waiting for shard {placement.shard} to load generation {tenant.generation}"
        return PHASE_PLACED, [
            placed,
            Condition(MODULE_READY, "Unknown", AWAITING_SHARD, wait),
            Condition(READY, "False", AWAITING_SHARD, wait),
        ]
    if report.loaded and report.reason == ASLEEP:
        # Ready: a request is answered (it wakes the tenant); the phase says who holds no GPU memory.
        return PHASE_ASLEEP, [
            placed,
            Condition(MODULE_READY, "True", ASLEEP, report.message or "asleep in a snapshot"),
            Condition(
                READY, "True", ASLEEP, f"asleep on shard {placement.shard}; wakes on the first request"
            ),
        ]
    if report.loaded:
        reason = report.reason or MODULE_LOADED
        return PHASE_READY, [
            placed,
            Condition(MODULE_READY, "True", reason, report.message or "module loaded"),
            Condition(READY, "True", SERVING, f"serving on shard {placement.shard}"),
        ]
    reason = report.reason or SHARD_FAILED
    message = report.message or f"shard {placement.shard} could not load the module"
    return DEGRADED, [
        placed,
        Condition(MODULE_READY, "False", reason, message),
        Condition(READY, "False", reason, message),
    ]


def human_bytes(count: int) -> str:
    """Bytes as kubectl users read them: 0, 512, 1.5Ki, 12Mi, 3Gi (one decimal, binary units)."""
    value, unit = float(count), ""
    for unit in ("", "Ki", "Mi", "Gi", "Ti", "Pi"):
        if abs(value) < 1024 or unit == "Pi":
            break
        value /= 1024
    return f"{value:.1f}".removesuffix(".0") + unit if unit else str(count)


def truncate_message(message: str) -> str:
    return message[:MESSAGE_LIMIT]


def condition_dict(cond: Condition, generation: int, now: str) -> dict[str, Any]:
    """One condition as the API stores it, new (lastTransitionTime is `now`)."""
    return {
        "type": cond.type,
        "status": cond.status,
        "reason": cond.reason,
        "message": truncate_message(cond.message),
        "observedGeneration": generation,
        "lastTransitionTime": now,
    }


def merge_conditions(
    live: Sequence[Mapping[str, Any]], desired: Sequence[Condition], generation: int, now: str
) -> list[dict[str, Any]]:
    """Desired conditions as API dicts; lastTransitionTime moves only when status changes."""
    previous = {c.get("type"): c for c in live if isinstance(c, Mapping)}
    out: list[dict[str, Any]] = []
    for cond in desired:
        old = previous.get(cond.type)
        fresh = condition_dict(cond, generation, now)
        if old is not None and old.get("status") == cond.status:
            fresh["lastTransitionTime"] = old.get("lastTransitionTime", now)
        out.append(fresh)
    return out


def desired_status(
    tenant: Tenant, placement: Placement, endpoint: str | None, token_secret: str | None, now: str
) -> dict[str, Any]:
    """The operator-owned part of status.  Keys set to None are removed by the merge patch."""
    phase, conds = tenant_phase(tenant, placement)
    report = tenant.runtime
    gpu = report.gpu_bytes_in_use if report is not None and report.shard == placement.shard else 0
    return {
        "phase": phase,
        "shard": placement.shard,
        "endpoint": endpoint if placement.shard is not None else None,
        "tokenSecretName": token_secret,
        "gpuBytesInUse": gpu,
        "gpuInUse": human_bytes(gpu),
        "observedGeneration": tenant.generation,
        "conditions": merge_conditions(tenant.status.get("conditions") or [], conds, tenant.generation, now),
    }


def status_patch(live: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of `desired` that differ from `live` (empty: nothing to write)."""
    return {k: v for k, v in desired.items() if live.get(k) != v}
