"""The host capacity model: four sizing formulas evaluated for a workload on a SKU.

Owns the formulas (memory, GPU memory, CPU, disk IOPS) with their safety multipliers, the SKU
ceilings, the binding bottleneck, the recommendation and the re-plan triggers. Pure: takes a
`Workload` and `Sku`s, returns dataclasses; must not import yaml, matplotlib or the CLI.

  memory     2 * (resident * instances * working_set + snapshots_in_flight * snapshot_payload + runtime)
  gpuMemory  1.5 * resident * (context_overhead + gpu_working_set)
             resident = awake_at_once(tenants, active_fraction): idle tenants sleep in snapshots (no
             instances, no GPU memory), so only the awake ones count: the room that a waking tenant
             finds full at most 1% of the time (a binomial tail, not the mean); all when nothing sleeps
             context_overhead = mps_client_overhead with MPS, else instances * cuda_context
  cpu        ceil(qps * cpu_per_request / target_utilisation)
  diskIops   2 * snapshot_ops + audit_writes + background_iops
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from tensorwasm.planner.admission import GPU_FRAGMENTATION_HEADROOM
from tensorwasm.planner.awake import SWAP_TOLERANCE as SWAP_TOLERANCE  # `tensorwasm plan` reads it here
from tensorwasm.planner.awake import awake_at_once
from tensorwasm.planner.figures import Figure, Formula, combined_source, modeled
from tensorwasm.planner.skus import Sku
from tensorwasm.planner.units import format_bytes, format_seconds

# The runtime's audit log (runtime/tensorwasm/runtime/audit.py) writes one batch per 50 ms flush,
# however many records it holds: a shard makes at most this many audit writes a second.
# tests/unit/test_runtime_jobs.py holds it equal to 1 / AuditSettings.flush_s.
AUDIT_WRITES_PER_S_PER_SHARD = 20.0
MEMORY_MULTIPLIER = 2.0  # live + snapshot coexistence in a rolling restart, GC, one tenant doubling
SNAPSHOT_IOPS_MULTIPLIER = 2.0  # snapshot I/O is bursty
DEFAULTS = "default (capacity model)"
PHYSICAL = ("memory", "gpuMemory", "cpu", "diskIops")


@dataclass(frozen=True)
class Workload:
    """What the operator expects to run on one host. Figures carry measured/modeled tags."""

    tenants: Figure
    qps: Figure
    instances_per_tenant: Figure
    working_set: Figure  # bytes per warm instance: linear memory + Wasmtime overhead
    gpu_working_set: Figure  # bytes per tenant
    cpu_per_request: Figure  # seconds
    target_utilisation: Figure
    cuda_context: Figure  # bytes per instance without MPS
    mps_client_overhead: Figure  # bytes per tenant with MPS
    runtime: Figure  # bytes: OS, runtime, router, metrics, audit buffers
    snapshot_ops: Figure | None  # per second, all tenants; None = one per tenant per minute
    audit_writes: Figure | None  # per second; None = one per request
    background_iops: Figure
    mps: bool | None = None  # None = the SKU's setting
    snapshots_in_flight: Figure | None = None  # None = the SKU's snapshot buffer
    snapshot_payload: Figure | None = None
    active_fraction: Figure | None = None  # share of tenants awake at once; None = 1 (none sleeps)

    def scaled(self, *, tenants: float | None = None, qps: float | None = None, hosts: int = 1) -> Workload:
        """The same workload with a different tenant count / QPS, or split evenly over `hosts`."""
        t = self.tenants.value if tenants is None else tenants
        q = self.qps.value if qps is None else qps
        out = replace(
            self,
            tenants=replace(self.tenants, value=math.ceil(t / hosts)),
            qps=replace(self.qps, value=q / hosts),
        )
        if self.snapshot_ops is not None and hosts > 1:
            out = replace(out, snapshot_ops=replace(self.snapshot_ops, value=self.snapshot_ops.value / hosts))
        if self.audit_writes is not None and hosts > 1:
            out = replace(out, audit_writes=replace(self.audit_writes, value=self.audit_writes.value / hosts))
        return out


def default_workload(tenants: float, qps: float) -> Workload:
    """The capacity model's default assumptions (16 MiB working set, 256 MiB GPU, 2 ms CPU, 60%)."""
    return Workload(
        tenants=modeled(tenants, "tenants", "--tenants"),
        qps=modeled(qps, "req/s", "--qps"),
        instances_per_tenant=modeled(1, "instances", DEFAULTS),
        working_set=modeled(16 << 20, "bytes", DEFAULTS),
        gpu_working_set=modeled(256 << 20, "bytes", DEFAULTS),
        cpu_per_request=modeled(0.002, "s", DEFAULTS),
        target_utilisation=modeled(0.6, "fraction", DEFAULTS),
        cuda_context=modeled(30 << 20, "bytes", DEFAULTS),
        mps_client_overhead=modeled(5 << 20, "bytes", DEFAULTS),
        runtime=modeled(1 << 30, "bytes", DEFAULTS),
        snapshot_ops=None,
        audit_writes=None,
        background_iops=modeled(100, "IOPS", DEFAULTS),
    )


def resident_tenants(w: Workload) -> float:
    """Tenants the host must hold awake: all of them, or `awake_at_once` when idle ones sleep."""
    if w.active_fraction is None:
        return w.tenants.value
    return float(awake_at_once(w.tenants.value, w.active_fraction.value))


def tenants_with_sleep(all_resident: int, active_fraction: float) -> int:
    """The most tenants whose `awake_at_once` fits the room where `all_resident` fit awake: the
    model the runtime's resident budget is sized by (bench/bench_sleep.py measures it)."""
    if active_fraction >= 1:
        return all_resident
    low, high = min(all_resident, 1), max(all_resident, math.floor(round(all_resident / active_fraction, 9)))
    while low < high:  # awake_at_once never falls as tenants grow; the mean n * f bounds it from above
        mid = (low + high + 1) // 2
        if awake_at_once(mid, active_fraction) <= all_resident:
            low = mid
        else:
            high = mid - 1
    return low


def swap_onset(all_resident: int, active_fraction: float) -> int:
    """The fewest tenants at which more than SWAP_TOLERANCE of wakes find the room full and put an
    awake tenant to sleep first: one past `tenants_with_sleep`. bench_sleep.py measures it with
    independent tenants on the runtime's ledger (`onset_measured_tenants`)."""
    return tenants_with_sleep(all_resident, active_fraction) + 1


def _who(w: Workload) -> str:
    return "tenants" if w.active_fraction is None else "awake_at_once(tenants, active_fraction)"


def _mps(workload: Workload, sku: Sku) -> bool:
    return sku.mps if workload.mps is None else workload.mps


def memory_formula(w: Workload, sku: Sku) -> Formula:
    in_flight = w.snapshots_in_flight or modeled(sku.snapshots_in_flight, "snapshots", f"SKU {sku.name}")
    payload = w.snapshot_payload or modeled(sku.snapshot_payload_bytes, "bytes", f"SKU {sku.name}")
    resident = resident_tenants(w)
    instances = resident * w.instances_per_tenant.value
    inner = instances * w.working_set.value + in_flight.value * payload.value + w.runtime.value
    required = MEMORY_MULTIPLIER * inner
    terms = {
        "tenants": w.tenants,
        "instances_per_tenant": w.instances_per_tenant,
        "working_set": w.working_set,
        "snapshots_in_flight": in_flight,
        "snapshot_payload": payload,
        "runtime": w.runtime,
        **({"active_fraction": w.active_fraction} if w.active_fraction is not None else {}),
    }
    return Formula(
        resource="memory",
        expression=(
            f"2 * ({_who(w)} * instances_per_tenant * working_set"
            " + snapshots_in_flight * snapshot_payload + runtime)"
        ),
        substituted=(
            f"2 * ({resident:g} * {w.instances_per_tenant.value:g}"
            f" * {format_bytes(w.working_set.value)}"
            f" + {in_flight.value:g} * {format_bytes(payload.value)} + {format_bytes(w.runtime.value)})"
            f" = 2 * {format_bytes(inner)} = {format_bytes(required)}"
        ),
        terms=terms,
        required=Figure(required, "bytes", "modeled", "formula"),
        available=modeled(sku.memory_bytes, "bytes", f"SKU {sku.name}"),
    )


def gpu_formula(w: Workload, sku: Sku) -> Formula:
    mps = _mps(w, sku)
    if mps:
        overhead = w.mps_client_overhead
        overhead_text = f"{format_bytes(overhead.value)} MPS client"
    else:
        overhead = Figure(
            w.instances_per_tenant.value * w.cuda_context.value,
            "bytes",
            combined_source(w.cuda_context),
            f"{w.instances_per_tenant.value:g} instances * {w.cuda_context.origin}",
        )
        overhead_text = (
            f"{w.instances_per_tenant.value:g} * {format_bytes(w.cuda_context.value)} CUDA context"
        )
    per_tenant = overhead.value + w.gpu_working_set.value
    resident = resident_tenants(w)
    required = GPU_FRAGMENTATION_HEADROOM * resident * per_tenant
    return Formula(
        resource="gpuMemory",
        expression=f"1.5 * {_who(w)} * (context_overhead + gpu_working_set)",
        substituted=(
            f"1.5 * {resident:g} * ({overhead_text} + {format_bytes(w.gpu_working_set.value)})"
            f" = 1.5 * {format_bytes(resident * per_tenant)} = {format_bytes(required)}"
        ),
        terms={
            "tenants": w.tenants,
            "context_overhead": overhead,
            "gpu_working_set": w.gpu_working_set,
            **({"active_fraction": w.active_fraction} if w.active_fraction is not None else {}),
        },
        required=Figure(required, "bytes", "modeled", "formula"),
        available=modeled(sku.gpu.memory_bytes, "bytes", f"SKU {sku.name} ({sku.gpu.name})"),
        notes=(f"MPS {'on' if mps else 'off'}",),
    )


def cpu_formula(w: Workload, sku: Sku) -> Formula:
    raw = w.qps.value * w.cpu_per_request.value / w.target_utilisation.value
    # Round away float noise (1000 * 0.002 / 0.6) before the ceiling.
    required = math.ceil(round(raw, 9))
    return Formula(
        resource="cpu",
        expression="ceil(qps * cpu_per_request / target_utilisation)",
        substituted=(
            f"ceil({w.qps.value:g} * {format_seconds(w.cpu_per_request.value)} / "
            f"{w.target_utilisation.value:g}) = ceil({raw:.2f}) = {required} vCPU"
        ),
        terms={
            "qps": w.qps,
            "cpu_per_request": w.cpu_per_request,
            "target_utilisation": w.target_utilisation,
        },
        required=Figure(required, "vCPU", "modeled", "formula"),
        available=modeled(sku.vcpu, "vCPU", f"SKU {sku.name}"),
    )


def snapshot_ops(w: Workload) -> Figure:
    if w.snapshot_ops is not None:
        return w.snapshot_ops
    return modeled(w.tenants.value / 60.0, "ops/s", "default: one capture or restore per tenant per minute")


def audit_writes(w: Workload) -> Figure:
    if w.audit_writes is not None:
        return w.audit_writes
    # One record per request, written in batches: min(qps, batches a second) writes (one shard a host).
    return Figure(
        min(w.qps.value, AUDIT_WRITES_PER_S_PER_SHARD),
        "writes/s",
        w.qps.source,
        "default: one audit record per request, one write per 50 ms batch",
    )


def iops_formula(w: Workload, sku: Sku) -> Formula:
    snaps, audit = snapshot_ops(w), audit_writes(w)
    required = SNAPSHOT_IOPS_MULTIPLIER * snaps.value + audit.value + w.background_iops.value
    return Formula(
        resource="diskIops",
        expression="2 * snapshot_ops + audit_writes + background_iops",
        substituted=(
            f"2 * {snaps.value:.2f} + {audit.value:g} + {w.background_iops.value:g} = {required:.1f} IOPS"
        ),
        terms={"snapshot_ops": snaps, "audit_writes": audit, "background_iops": w.background_iops},
        required=Figure(required, "IOPS", "modeled", "formula"),
        available=modeled(sku.disk_iops, "IOPS", f"SKU {sku.name}"),
    )


def ceiling_formulas(w: Workload, sku: Sku) -> list[Formula]:
    """The SKU's tenant and QPS ceilings, as checks beside the formulas (modeled assumptions)."""
    return [
        Formula(
            resource="tenantCeiling",
            expression="tenants <= tenant_ceiling",
            substituted=f"{resident_tenants(w):g} <= {sku.tenant_ceiling}",
            terms={"tenants": w.tenants},
            required=replace(w.tenants, value=resident_tenants(w)),
            available=modeled(sku.tenant_ceiling, "tenants", f"SKU {sku.name}"),
        ),
        Formula(
            resource="qpsCeiling",
            expression="qps <= qps_ceiling",
            substituted=f"{w.qps.value:g} <= {sku.qps_ceiling:g}",
            terms={"qps": w.qps},
            required=w.qps,
            available=modeled(sku.qps_ceiling, "req/s", f"SKU {sku.name}"),
        ),
    ]


@dataclass(frozen=True)
class SkuFit:
    sku: Sku
    formulas: tuple[Formula, ...]

    @property
    def fits(self) -> bool:
        return all(f.fits for f in self.formulas)

    @property
    def binding(self) -> Formula:
        """The bottleneck: the check furthest past its limit, else the physical resource closest to it."""
        broken = [f for f in self.formulas if not f.fits]
        pool = broken or [f for f in self.formulas if f.resource in PHYSICAL]
        return max(pool, key=lambda f: f.utilisation)

    def to_json(self) -> dict[str, Any]:
        return {
            "sku": self.sku.to_json(),
            "fits": self.fits,
            "binding": self.binding.resource,
            "formulas": [f.to_json() for f in self.formulas],
        }


def evaluate(w: Workload, sku: Sku) -> SkuFit:
    formulas = (memory_formula(w, sku), gpu_formula(w, sku), cpu_formula(w, sku), iops_formula(w, sku))
    return SkuFit(sku, (*formulas, *ceiling_formulas(w, sku)))


def size_order(skus: tuple[Sku, ...]) -> list[Sku]:
    """Smallest host first: the recommendation is the first SKU that fits."""
    return sorted(skus, key=lambda s: (s.gpu.memory_bytes, s.memory_bytes, s.vcpu, s.disk_iops))


def max_tenants(w: Workload, sku: Sku, *, limit: int = 1_000_000) -> int:
    """The largest tenant count for which every check fits (0 when none does). Monotone, so bisect."""
    if not evaluate(w.scaled(tenants=1), sku).fits:
        return 0
    ceiling = (
        sku.tenant_ceiling
        if w.active_fraction is None
        else tenants_with_sleep(sku.tenant_ceiling, w.active_fraction.value)
    )
    low, high = 1, min(limit, ceiling)
    while low < high:
        mid = (low + high + 1) // 2
        if evaluate(w.scaled(tenants=mid), sku).fits:
            low = mid
        else:
            high = mid - 1
    return low


@dataclass(frozen=True)
class Trigger:
    id: str
    applies: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "applies": self.applies, "reason": self.reason}


def replan_triggers(w: Workload, sku: Sku) -> list[Trigger]:
    """Which of the re-plan triggers bite for this workload on this SKU, with the threshold that bites."""
    triggers: list[Trigger] = []
    most = max_tenants(w, sku)
    near = w.tenants.value >= 0.8 * most
    triggers.append(
        Trigger(
            "tenant-onboarding",
            near,
            f"{w.tenants.value:g} of at most {most} tenants fit on {sku.name}"
            + ("; within 20% of the limit: plan the next SKU or a shard" if near else ""),
        )
    )
    doubled = evaluate(w.scaled(qps=2 * w.qps.value), sku)
    triggers.append(
        Trigger(
            "traffic-doubles",
            not doubled.fits,
            f"at {2 * w.qps.value:g} req/s {sku.name} "
            + (f"breaks on {doubled.binding.resource}" if not doubled.fits else "still fits"),
        )
    )
    grown = evaluate(replace(w, working_set=replace(w.working_set, value=4 * w.working_set.value)), sku)
    triggers.append(
        Trigger(
            "working-set-grows",
            not grown.fits,
            f"a 4x working set ({format_bytes(4 * w.working_set.value)}) "
            + (f"breaks {grown.binding.resource}" if not grown.fits else "still fits"),
        )
    )
    mps_now = _mps(w, sku)
    toggled = evaluate(replace(w, mps=not mps_now), sku)
    now_fits = evaluate(w, sku).fits
    triggers.append(
        Trigger(
            "mps-toggled",
            toggled.fits != now_fits,
            f"turning MPS {'off' if mps_now else 'on'} "
            + (
                f"{'breaks' if now_fits else 'fixes'} the fit (gpuMemory "
                f"{format_bytes(gpu_formula(replace(w, mps=not mps_now), sku).required.value)})"
                if toggled.fits != now_fits
                else "does not change the fit"
            ),
        )
    )
    for tid, reason in (
        (
            "hardware-swap",
            f"the numbers are for {sku.gpu.name}, {sku.vcpu} vCPU; another GPU or CPU re-plans",
        ),
        ("new-release", "re-validate the bench figures at every minor TensorWasm release"),
        ("quarterly", "re-plan at least quarterly; assumptions drift"),
    ):
        triggers.append(Trigger(tid, True, reason))
    return triggers


@dataclass(frozen=True)
class Plan:
    workload: Workload
    fits: tuple[SkuFit, ...]  # every SKU considered, smallest first
    recommended: SkuFit | None  # smallest single host that fits
    sharded: tuple[SkuFit, int] | None  # when none fits: the SKU needing fewest hosts, and how many
    triggers: tuple[Trigger, ...]

    def to_json(self) -> dict[str, Any]:
        w = self.workload
        return {
            "workload": {
                name: getattr(w, name).to_json()
                for name in (
                    "tenants",
                    "qps",
                    "instances_per_tenant",
                    "working_set",
                    "gpu_working_set",
                    "cpu_per_request",
                    "target_utilisation",
                    "cuda_context",
                    "mps_client_overhead",
                    "runtime",
                    "background_iops",
                )
            }
            | {
                "snapshot_ops": snapshot_ops(w).to_json(),
                "audit_writes": audit_writes(w).to_json(),
                "mps": w.mps,
            },
            "recommended": self.recommended.sku.name if self.recommended else None,
            "binding": self.recommended.binding.resource if self.recommended else None,
            "sharded": {"sku": self.sharded[0].sku.name, "hosts": self.sharded[1]} if self.sharded else None,
            "skus": [fit.to_json() for fit in self.fits],
            "replanTriggers": [t.to_json() for t in self.triggers if t.applies],
        }


def plan(w: Workload, skus: tuple[Sku, ...], *, only: Sku | None = None, max_hosts: int = 10_000) -> Plan:
    ordered = [only] if only else size_order(skus)
    fits = tuple(evaluate(w, sku) for sku in ordered)
    recommended = next((f for f in fits if f.fits), None)
    sharded: tuple[SkuFit, int] | None = None
    if recommended is None:
        best: tuple[SkuFit, int] | None = None
        for sku in ordered:
            hosts = _hosts_needed(w, sku, max_hosts)
            if hosts and (best is None or hosts < best[1]):
                best = (evaluate(w.scaled(hosts=hosts), sku), hosts)
        sharded = best
    target = recommended or (sharded[0] if sharded else None)
    per_host = w.scaled(hosts=sharded[1]) if sharded else w
    triggers = tuple(replan_triggers(per_host, target.sku)) if target else ()
    return Plan(w, fits, recommended, sharded, triggers)


def _hosts_needed(w: Workload, sku: Sku, max_hosts: int) -> int | None:
    if not evaluate(w.scaled(tenants=1, qps=0), sku).fits:
        return None  # even one idle tenant does not fit: more hosts cannot help
    for hosts in range(2, max_hosts + 1):
        if evaluate(w.scaled(hosts=hosts), sku).fits:
            return hosts
    return None
