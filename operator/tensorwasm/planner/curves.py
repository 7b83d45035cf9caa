"""Tenants-per-host curves: for each SLO and SKU, the most tenants a host serves at a given QPS.

Owns the SLO list and the per-cell rule: a cell is the largest tenant count for which every
sizing check fits at that aggregate QPS (0 = not servable, e.g. over the SKU's QPS ceiling), and
it is *measured* only when a benchmark showed the SLO's latency met with at least that many
tenants and that much load. Pure; must not import matplotlib or the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tensorwasm.planner.bench import Evidence
from tensorwasm.planner.figures import Source
from tensorwasm.planner.model import Workload, max_tenants
from tensorwasm.planner.skus import Sku

TABLE_QPS: tuple[float, ...] = (10, 100, 1000, 10000)


@dataclass(frozen=True)
class Slo:
    id: str
    title: str
    p95_s: float | None  # latency target; None for availability, which density does not move
    evidence: str | None  # bench.FIGURE_NAMES key of the latency figure that backs a cell
    gpu_bound: bool


SLOS: tuple[Slo, ...] = (
    Slo("availability", "99.5% availability", None, None, False),
    Slo("invoke-p95-host", "100 ms P95 /invoke (host-only)", 0.100, "invoke_p95", False),
    Slo("invoke-p95-gpu", "500 ms P95 /invoke (GPU-bound)", 0.500, "gpu_invoke_p95", True),
)


@dataclass(frozen=True)
class Cell:
    qps: float
    tenants: int  # 0 = not servable at this QPS
    source: Source
    why: str

    def to_json(self) -> dict[str, Any]:
        return {"qps": self.qps, "tenants": self.tenants, "source": self.source, "why": self.why}


def cell(w: Workload, sku: Sku, slo: Slo, qps: float, evidence: Evidence, gpu_time_s: float) -> Cell:
    at_load = w.scaled(qps=qps)
    if qps > sku.qps_ceiling:
        return Cell(qps, 0, "modeled", f"over the {sku.name} QPS ceiling ({sku.qps_ceiling:g})")
    if slo.gpu_bound and qps * gpu_time_s > w.target_utilisation.value:
        busy = qps * gpu_time_s
        return Cell(qps, 0, "modeled", f"GPU busy {busy:.2f} s/s over target {w.target_utilisation.value:g}")
    n = max_tenants(at_load, sku)
    if slo.evidence is None or slo.p95_s is None:
        return Cell(qps, n, "modeled", "no availability data: density from the sizing checks")
    found = evidence.lookup(slo.evidence)
    if found is None:
        return Cell(qps, n, "modeled", f"no bench figure for {slo.evidence}")
    if found.value > slo.p95_s:
        return Cell(
            qps, 0, "measured", f"{found.origin} = {found.value * 1e3:.1f} ms misses {slo.p95_s * 1e3:g} ms"
        )
    bench_tenants = evidence.in_same_file(found.origin, "tenants") or 1
    bench_qps = evidence.in_same_file(found.origin, "qps") or 0
    if bench_tenants >= n and bench_qps >= qps:
        return Cell(
            qps, n, "measured", f"{found.origin} met with {bench_tenants:g} tenants at {bench_qps:g} req/s"
        )
    return Cell(
        qps, n, "modeled", f"{found.origin} met, but with {bench_tenants:g} tenants at {bench_qps:g} req/s"
    )


@dataclass(frozen=True)
class Curves:
    slos: tuple[Slo, ...]
    skus: tuple[Sku, ...]
    cells: dict[tuple[str, str], tuple[Cell, ...]]  # (slo id, sku name) -> one cell per QPS

    def to_json(self) -> dict[str, Any]:
        return {
            slo.id: {
                "title": slo.title,
                "skus": {
                    sku.name: [c.to_json() for c in self.cells[(slo.id, sku.name)]] for sku in self.skus
                },
            }
            for slo in self.slos
        }


def tenants_per_host(
    w: Workload,
    skus: tuple[Sku, ...],
    evidence: Evidence,
    *,
    gpu_time_s: float,
    qps_points: tuple[float, ...] = TABLE_QPS,
) -> Curves:
    cells = {
        (slo.id, sku.name): tuple(cell(w, sku, slo, q, evidence, gpu_time_s) for q in qps_points)
        for slo in SLOS
        for sku in skus
    }
    return Curves(SLOS, skus, cells)


def log_grid(low: float = 1.0, high: float = 20000.0, points: int = 60) -> tuple[float, ...]:
    """QPS points evenly spaced on a log axis, for the plot."""
    ratio = (high / low) ** (1 / (points - 1))
    return tuple(low * ratio**i for i in range(points))
