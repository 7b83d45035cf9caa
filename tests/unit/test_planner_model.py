"""The four sizing formulas against hand-worked examples, the recommendation and re-plan triggers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tensorwasm.planner.figures import modeled
from tensorwasm.planner.model import (
    cpu_formula,
    default_workload,
    evaluate,
    gpu_formula,
    iops_formula,
    max_tenants,
    memory_formula,
    plan,
)
from tensorwasm.planner.skus import reference_catalog

MI, GI = 1 << 20, 1 << 30
CATALOG = reference_catalog()
MEDIUM = CATALOG.sku("Medium")


def test_memory_formula_medium_example() -> None:
    # 2 * (50 * 16 MiB + 4 * 64 MiB + 1 GiB) = 2 * 2080 MiB = 4160 MiB
    f = memory_formula(default_workload(50, 1000), MEDIUM)
    assert f.required.value == 4160 * MI
    assert f.available.value == 64 * GI
    assert f.fits and "= 2 * 2.0Gi" in f.substituted


def test_gpu_formula_with_and_without_mps() -> None:
    # MPS: 1.5 * 50 * (5 MiB + 256 MiB) = 19575 MiB
    w = default_workload(50, 1000)
    assert gpu_formula(w, MEDIUM).required.value == 19575 * MI
    # No MPS, 2 warm instances per tenant: each pays a 30 MiB context -> 1.5 * 50 * (60 + 256) MiB
    w2 = replace(w, mps=False, instances_per_tenant=modeled(2, "instances", "test"))
    f = gpu_formula(w2, MEDIUM)
    assert f.required.value == 1.5 * 50 * 316 * MI
    assert f.notes == ("MPS off",)


def test_cpu_formula_rounds_up() -> None:
    # ceil(1000 * 0.002 / 0.6) = ceil(3.33) = 4
    f = cpu_formula(default_workload(50, 1000), MEDIUM)
    assert f.required.value == 4
    # the heavy fixture: ceil(1000 * 0.506 / 0.6) = 844
    heavy = replace(default_workload(50, 1000), cpu_per_request=modeled(0.506, "s", "test"))
    assert cpu_formula(heavy, MEDIUM).required.value == 844
    # exactly on an integer stays there: ceil(600 * 0.001 / 0.6) = 1, not 2
    assert (
        cpu_formula(
            replace(default_workload(1, 600), cpu_per_request=modeled(0.001, "s", "t")), MEDIUM
        ).required.value
        == 1
    )


def test_iops_formula() -> None:
    # 2 * 60/60 + 20 audit (1000 records/s, one write per 50 ms batch) + 100 background = 122
    f = iops_formula(default_workload(60, 1000), MEDIUM)
    assert f.required.value == pytest.approx(122)
    # below 20 requests/s each record is its own batch
    assert iops_formula(default_workload(60, 10), MEDIUM).required.value == pytest.approx(112)


def test_binding_bottleneck_and_headroom() -> None:
    fit = evaluate(default_workload(50, 1000), MEDIUM)
    assert fit.fits
    assert fit.binding.resource == "gpuMemory"
    gpu = next(f for f in fit.formulas if f.resource == "gpuMemory")
    assert gpu.headroom == MEDIUM.gpu.memory_bytes - 19575 * MI


def test_recommends_smallest_fitting_sku() -> None:
    assert plan(default_workload(10, 100), CATALOG.skus).recommended.sku.name == "Small"  # type: ignore[union-attr]
    assert plan(default_workload(50, 1000), CATALOG.skus).recommended.sku.name == "Medium"  # type: ignore[union-attr]
    big = plan(default_workload(100, 1000), CATALOG.skus)
    assert big.recommended is not None and big.recommended.sku.name == "Large"


def test_shards_when_no_host_fits() -> None:
    p = plan(default_workload(1000, 5000), CATALOG.skus)
    assert p.recommended is None and p.sharded is not None
    fit, hosts = p.sharded
    assert fit.sku.name == "Large" and fit.fits
    # 208 tenants fit one Large on GPU memory: 1000 tenants need ceil(1000 / 208) = 5 hosts
    assert hosts == 5


def test_max_tenants_is_gpu_bound_on_large() -> None:
    # floor(79.6 GiB / (1.5 * 261 MiB)) = 208
    large = CATALOG.sku("Large")
    assert max_tenants(default_workload(1, 100), large) == int(large.gpu.memory_bytes // (1.5 * 261 * MI))


def test_replan_triggers() -> None:
    p = plan(default_workload(50, 1000), CATALOG.skus)
    applying = {t.id: t.reason for t in p.triggers if t.applies}
    assert "tenant-onboarding" in applying and "traffic-doubles" in applying
    assert "qpsCeiling" in applying["traffic-doubles"]
    assert "working-set-grows" not in applying  # 4 x 16 MiB still fits 64 GiB
    p2 = plan(default_workload(200, 1000), CATALOG.skus)
    applying2 = {t.id: t.reason for t in p2.triggers if t.applies}
    assert "mps-toggled" in applying2 and "breaks" in applying2["mps-toggled"]


def test_plan_json_tags_every_figure() -> None:
    doc = plan(default_workload(50, 1000), CATALOG.skus).to_json()
    assert doc["recommended"] == "Medium" and doc["binding"] == "gpuMemory"
    for fit in doc["skus"]:
        for f in fit["formulas"]:
            assert {"expression", "substituted", "required", "available", "headroom", "fits"} <= set(f)
            for fig in [f["required"], f["available"], *f["terms"].values()]:
                assert fig["source"] in ("measured", "modeled")
