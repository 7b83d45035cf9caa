"""The capacity model with idle sleep: only the active fraction of tenants holds memory and GPU memory."""

from __future__ import annotations

from dataclasses import replace

from tensorwasm.planner.figures import modeled
from tensorwasm.planner.model import (
    default_workload,
    evaluate,
    max_tenants,
    resident_tenants,
    tenants_with_sleep,
)
from tensorwasm.planner.skus import Sku, reference_catalog


def _sku(name: str) -> Sku:
    return reference_catalog().sku(name)


def test_a_tenth_active_holds_ten_times_the_tenants_where_gpu_memory_binds() -> None:
    large = _sku("Large")
    awake = max_tenants(default_workload(1, 100), large)
    sleepy = replace(default_workload(1, 100), active_fraction=modeled(0.1, "fraction", "--active-fraction"))
    held = max_tenants(sleepy, large)
    # ceil(held / 10) awake must fit: held is 10 * awake exactly (208 awake -> 2,080 placed)
    assert held == tenants_with_sleep(awake, 0.1) == 10 * awake


def test_resident_tenants_round_up_and_the_formulas_count_only_them() -> None:
    w = replace(default_workload(55, 100), active_fraction=modeled(0.1, "fraction", "--active-fraction"))
    assert resident_tenants(w) == 6  # 5.5 awake at once means 6 must fit
    fit = evaluate(w, _sku("Medium"))
    gpu = next(f for f in fit.formulas if f.resource == "gpuMemory")
    assert "ceil(tenants * active_fraction)" in gpu.expression and gpu.substituted.startswith("1.5 * 6 *")
    assert resident_tenants(default_workload(55, 100)) == 55  # nothing sleeps by default
