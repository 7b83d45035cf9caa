"""From raw user input (CLI flags) and bench evidence to a `Workload` whose figures carry their source.

Owns the precedence rule: an explicit flag wins, else a benchmark figure (tagged measured), else
the capacity model's default (tagged modeled). Must not import matplotlib or argparse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from tensorwasm.planner.bench import Evidence
from tensorwasm.planner.errors import PlanInputError
from tensorwasm.planner.figures import Figure, modeled
from tensorwasm.planner.model import Workload, default_workload
from tensorwasm.planner.units import parse_bytes, parse_fraction, parse_number, parse_seconds

# Default GPU time per request (launch + sync + a small kernel + transfers); modeled.
DEFAULT_GPU_TIME_S = 100e-6

_BYTES = (
    "working_set",
    "gpu_working_set",
    "cuda_context",
    "mps_client_overhead",
    "runtime",
    "snapshot_payload",
)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _parse(field: str, text: str) -> Figure:
    flag = _flag(field)
    if field in _BYTES:
        return modeled(parse_bytes(flag, text), "bytes", flag)
    if field == "cpu_per_request":
        return modeled(parse_seconds(flag, text), "s", flag)
    if field == "active_fraction":
        return modeled(parse_fraction(flag, text), "fraction", flag)
    if field == "target_utilisation":
        return modeled(parse_fraction(flag, text), "fraction", flag)
    if field == "instances_per_tenant":
        return modeled(parse_number(flag, text, minimum=1, maximum=10_000, integer=True), "instances", flag)
    if field == "snapshots_in_flight":
        return modeled(parse_number(flag, text, maximum=10_000, integer=True), "snapshots", flag)
    if field in ("snapshot_ops", "audit_writes", "background_iops"):
        return modeled(parse_number(flag, text, maximum=1e8), "per second", flag)
    raise PlanInputError(flag, "is not a workload input")


_EVIDENCE = {
    "cpu_per_request": ("cpu_per_request", "s"),
    "cuda_context": ("context_overhead", "bytes"),
    "mps_client_overhead": ("mps_client_overhead", "bytes"),
}


def build_workload(raw: Mapping[str, str | None], evidence: Evidence, mps: bool | None = None) -> Workload:
    """`raw` maps workload field names to the user's text (None = not given); tenants and qps required."""
    if raw.get("tenants") is None:
        raise PlanInputError("--tenants", "is required (how many active tenants one host must hold)")
    tenants = parse_number("--tenants", str(raw["tenants"]), minimum=1, maximum=1_000_000, integer=True)
    qps_text = raw.get("qps")
    qps = parse_number("--qps", qps_text, maximum=1e8) if qps_text is not None else tenants * 1.0
    w = default_workload(tenants, qps)
    if qps_text is None:
        w = replace(w, qps=modeled(qps, "req/s", "default: 1 req/s per tenant"))
    changes: dict[str, Any] = {"mps": mps}
    for field, (figure, unit) in _EVIDENCE.items():
        found = evidence.lookup(figure)
        if found is not None:
            changes[field] = Figure(found.value, unit, "measured", found.origin)
    for field, text in raw.items():
        if field not in ("tenants", "qps") and text is not None:
            changes[field] = _parse(field, text)
    return replace(w, **changes)


def gpu_time_per_request(text: str | None, evidence: Evidence) -> Figure:
    if text is not None:
        return modeled(parse_seconds("--gpu-time-per-request", text), "s", "--gpu-time-per-request")
    found = evidence.lookup("gpu_time_per_request")
    if found is not None:
        return Figure(found.value, "s", "measured", found.origin)
    return modeled(DEFAULT_GPU_TIME_S, "s", "default: launch + sync + small kernel")
