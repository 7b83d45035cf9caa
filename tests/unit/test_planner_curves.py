"""Tenants-per-host curves and the measured/modeled tagging driven by bench results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tensorwasm.planner.bench import NO_EVIDENCE, read_bench_results
from tensorwasm.planner.curves import tenants_per_host
from tensorwasm.planner.errors import PlanInputError
from tensorwasm.planner.inputs import build_workload
from tensorwasm.planner.model import default_workload
from tensorwasm.planner.skus import reference_catalog

SKUS = reference_catalog().skus


def cells(curves: object, slo: str, sku: str) -> list[tuple[int, str]]:
    return [(c.tenants, c.source) for c in curves.cells[(slo, sku)]]  # type: ignore[attr-defined]


def test_modeled_curves_follow_the_formulas() -> None:
    c = tenants_per_host(default_workload(1, 1), SKUS, NO_EVIDENCE, gpu_time_s=100e-6)
    assert cells(c, "availability", "Small") == [
        (10, "modeled"),
        (10, "modeled"),
        (0, "modeled"),
        (0, "modeled"),
    ]
    assert cells(c, "invoke-p95-host", "Medium")[2] == (50, "modeled")
    # Large: GPU memory allows 208 tenants; 10 000 req/s needs ceil(10000 * 2ms / 0.6) = 34 > 32 vCPU
    assert [t for t, _ in cells(c, "invoke-p95-host", "Large")] == [208, 208, 208, 0]
    # GPU SLO: 1000 req/s * 1 ms of GPU = 1.0 s/s > 0.6 target -> not servable
    slow_gpu = tenants_per_host(default_workload(1, 1), SKUS, NO_EVIDENCE, gpu_time_s=1e-3)
    assert cells(slow_gpu, "invoke-p95-gpu", "Large")[2] == (0, "modeled")
    assert "GPU busy" in slow_gpu.cells[("invoke-p95-gpu", "Large")][2].why


def write(tmp: Path, name: str, figures: dict[str, float]) -> None:
    (tmp / name).write_text(json.dumps({"title": name, "figures": figures}))


def test_bench_results_make_cells_and_terms_measured(tmp_path: Path) -> None:
    write(
        tmp_path, "invoke.json", {"invoke_p95_us": 850.0, "invoke_cpu_us": 450.0, "tenants": 64, "qps": 2000}
    )
    evidence = read_bench_results(tmp_path)
    w = build_workload({"tenants": "10", "qps": "100"}, evidence)
    assert w.cpu_per_request.source == "measured"
    assert w.cpu_per_request.value == pytest.approx(450e-6)
    assert w.cpu_per_request.origin == f"{tmp_path.name}/invoke.json:invoke_cpu_us"
    c = tenants_per_host(w, SKUS, evidence, gpu_time_s=100e-6)
    assert (
        cells(c, "invoke-p95-host", "Medium")[:3] == [(50, "measured")] * 3
    )  # 50 <= 64 tenants, <= 2000 req/s
    assert cells(c, "invoke-p95-host", "Large")[0][1] == "modeled"  # 208 tenants > the 64 measured
    assert cells(c, "availability", "Medium")[0][1] == "modeled"
    # an explicit flag beats the bench figure
    flagged = build_workload({"tenants": "10", "cpu_per_request": "3ms"}, evidence)
    assert flagged.cpu_per_request.source == "modeled" and flagged.cpu_per_request.value == pytest.approx(
        0.003
    )


def test_measured_latency_over_the_slo_empties_the_cell(tmp_path: Path) -> None:
    write(tmp_path, "slow.json", {"invoke_p95_ms": 140.0, "tenants": 64, "qps": 2000})
    evidence = read_bench_results(tmp_path)
    c = tenants_per_host(default_workload(1, 1), SKUS, evidence, gpu_time_s=100e-6)
    assert cells(c, "invoke-p95-host", "Medium")[0] == (0, "measured")


def test_bad_bench_dirs(tmp_path: Path) -> None:
    with pytest.raises(PlanInputError, match=r"--bench-results.*not a directory"):
        read_bench_results(tmp_path / "missing")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(PlanInputError, match="not readable JSON"):
        read_bench_results(tmp_path)
    (tmp_path / "broken.json").write_text('{"figures": [1]}')
    with pytest.raises(PlanInputError, match="'figures' mapping"):
        read_bench_results(tmp_path)
