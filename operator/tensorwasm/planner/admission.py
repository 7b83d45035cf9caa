"""Shard admission: does one more tenant fit on a runtime shard, and if not, which resource binds.

Owns the pure fit test the operator's placement uses (and the planner's per-shard view of the
capacity model). A tenant's demand comes from its validated spec (tensorwasm.api.tenant).
Must not import kopf, kubernetes, tensorwasm.runtime or anything that does I/O.

Rules (seeds' capacity model, applied to one shard's slice):
- gpuMemory: the tenants' GPU caps carry the 1.5x fragmentation headroom of the GPU-memory
  formula: ``1.5 * (used + demand) <= slice``. The slice is the MPS pinned device-memory limit the
  driver enforces on the shard process, so the headroom must sit inside it. Tenants share the
  shard's one CUDA context (MPS client), so no per-tenant context overhead is added here; a tenant
  without a cap (accounting only) reserves nothing.
- smPercent: plain sum of the tenants' MPS active-thread shares, ``used + demand <= slice``.
- hostMemory: ``used + demand <= slice`` where a tenant's demand is its linear memory times its
  max concurrency (one warm instance per concurrent invoke) plus a modeled Wasmtime per-instance
  overhead. The slice is the memory the shard gives to tenant instances; the host-level 2x
  multiplier, snapshot buffer and runtime budget are applied when the planner derives it.
- tenants: ``used + 1 <= max_tenants``.
- Idle sleep (docs/operator.md "Idle tenants sleep"): a tenant that may sleep holds GPU and host
  memory only while awake. With ``active_fraction`` f < 1 the sleepers (and the tenants following
  the shards' default, when it sleeps) count as the room a waking one finds full at most 1% of the
  time, not their mean f * sum: k = awake_at_once(n, f) caps of the cap-weighted mean cap, where
  n = (sum c)^2 / sum c^2 is their effective count (``sleepers_awake_bytes``). With equal caps that
  is exactly k caps of n tenants (f = 0.1: 32 tenants in a room of 8 caps, not 80). Tenants pinned
  awake (idle.after never) count whole. Whatever the active set turns out to be, the shard's
  resident budget (its runtime flag --resident-gpu-memory, the slice / 1.5) keeps awake caps within
  the slice by putting the least recently used idle tenants to sleep; a tail that is too low only
  costs wakes that evict. A single cap must still fit the slice on its own.
Resources are checked in that order (``RESOURCE_ORDER``); the first one exceeded is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tensorwasm.api.tenant import TenantSpec, parse_spec
from tensorwasm.planner.awake import SWAP_TOLERANCE, awake_at_once
from tensorwasm.planner.units import format_bytes

# Fragmentation headroom of the GPU-memory formula: CUDA allocators fragment under tenant churn.
GPU_FRAGMENTATION_HEADROOM = 1.5
# Wasmtime store + instance metadata + guard bookkeeping per warm instance (modeled, not measured).
INSTANCE_OVERHEAD_BYTES = 2 << 20

RESOURCE_ORDER: tuple[str, ...] = ("gpuMemory", "smPercent", "hostMemory", "tenants")


def _require_non_negative(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _require_percent(name: str, value: int) -> None:
    _require_non_negative(name, value)
    if value > 100:
        raise ValueError(f"{name} must be between 0 and 100, got {value}")


@dataclass(frozen=True)
class ShardCapacity:
    """One runtime shard's slice of a GPU node."""

    gpu_memory_bytes: int
    sm_percent: int
    host_memory_bytes: int
    max_tenants: int
    active_fraction: float = 1.0  # share of the sleepers expected awake at once (1: count them whole)
    idle_by_default: bool = False  # the shards' default idle.after is not `never`

    def __post_init__(self) -> None:
        _require_non_negative("gpuMemory", self.gpu_memory_bytes)
        _require_percent("smPercent", self.sm_percent)
        _require_non_negative("hostMemory", self.host_memory_bytes)
        _require_non_negative("maxTenants", self.max_tenants)
        if not 0 < self.active_fraction <= 1:
            raise ValueError(f"activeFraction must be above 0 and at most 1, got {self.active_fraction}")


@dataclass(frozen=True)
class TenantDemand:
    """What one tenant reserves on the shard it is placed on."""

    gpu_memory_bytes: int
    sm_percent: int
    host_memory_bytes: int
    sleeps: bool | None = None  # may sleep: True, False (idle.after never), None (the shards default)

    def __post_init__(self) -> None:
        _require_non_negative("gpuMemory", self.gpu_memory_bytes)
        _require_percent("smPercent", self.sm_percent)
        _require_non_negative("hostMemory", self.host_memory_bytes)


def sleepers_awake_bytes(total: int, squares: int, active_fraction: float) -> int:
    """Room, in bytes, for sleepers holding caps c_i (``total`` = sum c_i, ``squares`` = sum c_i^2),
    each awake ``active_fraction`` f of the time independently of the others.

    k = awake_at_once(n, f) tenants of the cap-weighted mean cap sum c^2 / sum c, where the
    effective count n = (sum c)^2 / sum c^2 gives the same mean and variance of awake bytes as the
    real caps. Equal caps: n is their count and this is k caps, the planner's room. Caps that differ
    lean towards the largest: one cap that dominates makes n near 1 and counts everything, and
    caps of 0 (accounting only, counted 0 as everywhere in admission) do not thin out the others'
    mean, as they would in a plain count of sleepers. Not the k largest caps, the strict
    bound: it needs every shard's caps sorted (admission stays O(1) per decision) and holds the k
    largest awake together, far rarer than 1 wake in 100 (0.62x the tenants). Over 434 seeded mixes
    of caps, computed exactly (bench/bench_admission_tail.py), this rule let 1.07% of wakes find the
    room full at p90 (worst 6.1%, with 5 tenants), the plain average cap 7.9% (worst 21.5%).
    Assumes tenants wake independently: a fleet that wakes together needs its peak, not a tail.
    """
    if total <= 0 or squares <= 0 or active_fraction >= 1:
        return max(total, 0)
    awake = awake_at_once(total * total / squares, active_fraction, SWAP_TOLERANCE)
    return min(total, -(-awake * squares // total))  # k * sum c^2 / sum c, rounded up to a byte


@dataclass(frozen=True)
class ShardUsage:
    """Sum of the demands already placed on a shard: O(1) to update (plus, minus) and to test."""

    gpu_memory_bytes: int = 0
    sm_percent: int = 0
    host_memory_bytes: int = 0
    tenants: int = 0
    # The parts of gpu_memory_bytes / host_memory_bytes held by tenants that may sleep: always
    # (sleeps True) and by the shards' default (sleeps None), with the sums of their squares, which
    # give the sleepers' effective count and cap-weighted mean cap (sleepers_awake_bytes).
    gpu_sleeping: int = 0
    host_sleeping: int = 0
    gpu_default: int = 0
    host_default: int = 0
    gpu_sleeping_sq: int = 0
    host_sleeping_sq: int = 0
    gpu_default_sq: int = 0
    host_default_sq: int = 0

    def plus(self, demand: TenantDemand, sign: int = 1) -> ShardUsage:
        gpu, host = demand.gpu_memory_bytes, demand.host_memory_bytes
        out = replace(
            self,
            gpu_memory_bytes=self.gpu_memory_bytes + sign * gpu,
            sm_percent=self.sm_percent + sign * demand.sm_percent,
            host_memory_bytes=self.host_memory_bytes + sign * host,
            tenants=self.tenants + sign,
        )
        if demand.sleeps is True:
            out = replace(
                out,
                gpu_sleeping=out.gpu_sleeping + sign * gpu, host_sleeping=out.host_sleeping + sign * host,
                gpu_sleeping_sq=out.gpu_sleeping_sq + sign * gpu * gpu,
                host_sleeping_sq=out.host_sleeping_sq + sign * host * host,
            )  # fmt: skip
        elif demand.sleeps is None:
            out = replace(
                out,
                gpu_default=out.gpu_default + sign * gpu, host_default=out.host_default + sign * host,
                gpu_default_sq=out.gpu_default_sq + sign * gpu * gpu,
                host_default_sq=out.host_default_sq + sign * host * host,
            )  # fmt: skip
        return out

    def minus(self, demand: TenantDemand) -> ShardUsage:
        return self.plus(demand, -1)

    def asleep(self, capacity: ShardCapacity) -> tuple[int, int, int, int]:
        """(GPU, GPU squares, host, host squares) of the tenants that may sleep on this shard."""
        by_default = capacity.idle_by_default
        return (
            self.gpu_sleeping + (self.gpu_default if by_default else 0),
            self.gpu_sleeping_sq + (self.gpu_default_sq if by_default else 0),
            self.host_sleeping + (self.host_default if by_default else 0),
            self.host_sleeping_sq + (self.host_default_sq if by_default else 0),
        )

    def expected(self, capacity: ShardCapacity) -> tuple[int, int]:
        """(GPU, host) bytes to hold awake: pinned tenants whole, sleepers at the 1% tail of their
        active fraction (sleepers_awake_bytes)."""
        gpu_asleep, gpu_sq, host_asleep, host_sq = self.asleep(capacity)
        f = capacity.active_fraction
        return (
            self.gpu_memory_bytes - gpu_asleep + sleepers_awake_bytes(gpu_asleep, gpu_sq, f),
            self.host_memory_bytes - host_asleep + sleepers_awake_bytes(host_asleep, host_sq, f),
        )


def tenant_demand(spec: TenantSpec) -> TenantDemand:
    """A tenant's reservation from its spec (gpuMemory, gpu.smPercent, linearMemory, maxConcurrency).

    The spec is already valid (tensorwasm.api.tenant bounds every field): no second check here.
    """
    limits = spec.limits
    host = limits.max_concurrency * (limits.linear_memory_bytes + INSTANCE_OVERHEAD_BYTES)
    after = spec.idle.after
    return TenantDemand(
        gpu_memory_bytes=limits.gpu_memory_bytes or 0, sm_percent=spec.sm_percent, host_memory_bytes=host,
        sleeps=None if after is None else after != "never",
    )  # fmt: skip


def admit_spec(spec: object) -> TenantDemand:
    """What a raw Tenant spec would reserve; raises InvalidSpec (the one Tenant validator) when invalid."""
    return tenant_demand(parse_spec(spec))


def gpu_bytes_needed(gpu_cap_sum: int) -> int:
    """GPU memory a set of caps needs with fragmentation headroom (rounded up to a byte)."""
    # Integer maths: 1.5x == 3/2, rounded up so a tenant never fits by a rounding accident.
    return (3 * gpu_cap_sum + 1) // 2


def _needed_and_available(
    capacity: ShardCapacity, used: ShardUsage, demand: TenantDemand
) -> dict[str, tuple[int, int]]:
    after = used.plus(demand)
    gpu, host = after.expected(capacity)  # all of it when nothing sleeps (active fraction 1)
    return {
        "gpuMemory": (gpu_bytes_needed(max(gpu, demand.gpu_memory_bytes)), capacity.gpu_memory_bytes),
        "smPercent": (after.sm_percent, capacity.sm_percent),
        "hostMemory": (max(host, demand.host_memory_bytes), capacity.host_memory_bytes),
        "tenants": (after.tenants, capacity.max_tenants),
    }


def binding_resource(capacity: ShardCapacity, used: ShardUsage, demand: TenantDemand) -> str | None:
    """None when the demand fits next to `used`; else the first exceeded resource in RESOURCE_ORDER."""
    checks = _needed_and_available(capacity, used, demand)
    for resource in RESOURCE_ORDER:
        needed, available = checks[resource]
        # A tenant asking for none of a resource never binds on it (accounting-only GPU, no SM share).
        if resource == "gpuMemory" and demand.gpu_memory_bytes == 0:
            continue
        if resource == "smPercent" and demand.sm_percent == 0:
            continue
        if needed > available:
            return resource
    return None


def _fmt(resource: str, value: int) -> str:
    if resource in ("gpuMemory", "hostMemory"):
        return format_bytes(value)
    if resource == "smPercent":
        return f"{value}%"
    return str(value)


def insufficient_capacity_message(
    capacity: ShardCapacity, used: ShardUsage, demand: TenantDemand, resource: str
) -> str:
    """A human message naming the binding resource with needed vs available figures."""
    if resource not in RESOURCE_ORDER:
        raise ValueError(f"resource must be one of {', '.join(RESOURCE_ORDER)}, got {resource!r}")
    needed, available = _needed_and_available(capacity, used, demand)[resource]
    if resource == "gpuMemory":
        detail = (
            f"needs {_fmt(resource, needed)} (1.5x fragmentation headroom on "
            f"{_fmt(resource, used.gpu_memory_bytes)} placed + {_fmt(resource, demand.gpu_memory_bytes)} cap"
        )
    elif resource == "tenants":
        detail = f"would be tenant {needed}"
    else:
        detail = f"needs {_fmt(resource, needed)} ({_fmt(resource, used_value(used, resource))} placed + "
        detail += f"{_fmt(resource, demand_value(demand, resource))} requested"
    if resource in ("gpuMemory", "hostMemory"):
        detail += _sleepers_note(capacity, used.plus(demand), resource) + ")"
    return f"insufficient {resource}: {detail}, shard has {_fmt(resource, available)}"


def _sleepers_note(capacity: ShardCapacity, after: ShardUsage, resource: str) -> str:
    """How the sleepers among the placed tenants were counted, or nothing when they count whole."""
    gpu, gpu_sq, host, host_sq = after.asleep(capacity)
    total, squares = (gpu, gpu_sq) if resource == "gpuMemory" else (host, host_sq)
    awake = sleepers_awake_bytes(total, squares, capacity.active_fraction)
    if awake >= total:
        return ""
    return (
        f", of which the sleepers' {_fmt(resource, total)} count as {_fmt(resource, awake)} awake at once: "
        f"the room a waking one finds full at most {SWAP_TOLERANCE:.0%} of the time at "
        f"{capacity.active_fraction:.0%} active"
    )


def used_value(used: ShardUsage, resource: str) -> int:
    return {
        "gpuMemory": used.gpu_memory_bytes,
        "smPercent": used.sm_percent,
        "hostMemory": used.host_memory_bytes,
        "tenants": used.tenants,
    }[resource]


def demand_value(demand: TenantDemand, resource: str) -> int:
    return {
        "gpuMemory": demand.gpu_memory_bytes,
        "smPercent": demand.sm_percent,
        "hostMemory": demand.host_memory_bytes,
        "tenants": 1,
    }[resource]
