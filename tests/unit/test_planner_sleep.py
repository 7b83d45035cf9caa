"""The capacity model with idle sleep: only the tenants awake at once hold memory and GPU memory."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from tensorwasm.planner.bench import read_bench_results
from tensorwasm.planner.figures import modeled
from tensorwasm.planner.model import (
    SWAP_TOLERANCE,
    awake_at_once,
    default_workload,
    evaluate,
    max_tenants,
    resident_tenants,
    swap_onset,
    tenants_with_sleep,
)
from tensorwasm.planner.skus import Sku, reference_catalog


def _sku(name: str) -> Sku:
    return reference_catalog().sku(name)


def _at_least(n: int, p: float, k: int) -> float:
    """P(Binomial(n, p) >= k) by brute force: the oracle for the planner's tail sum."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize(("tenants", "fraction"), [(2, 0.1), (33, 0.1), (55, 0.1), (80, 0.1), (500, 0.1),
                                                   (300, 0.25), (40, 0.5), (1000, 0.02)])  # fmt: skip
def test_awake_at_once_is_the_room_a_waking_tenant_finds_full_at_most_one_wake_in_100(
    tenants: int, fraction: float
) -> None:
    k = awake_at_once(tenants, fraction)
    assert _at_least(tenants - 1, fraction, k) <= SWAP_TOLERANCE < _at_least(tenants - 1, fraction, k - 1)
    assert k > tenants * fraction  # never the mean: half the wakes would find the room full there


def test_a_tenth_active_holds_fewer_than_ten_times_the_tenants_where_gpu_memory_binds() -> None:
    large = _sku("Large")
    awake = max_tenants(default_workload(1, 100), large)
    sleepy = replace(default_workload(1, 100), active_fraction=modeled(0.1, "fraction", "--active-fraction"))
    held = max_tenants(sleepy, large)
    # 208 awake: 1,776 placed (not 2,080: at 2,080, 10% awake on average, half the wakes find it full)
    assert held == tenants_with_sleep(awake, 0.1)
    assert awake_at_once(held, 0.1) <= awake < awake_at_once(held + 1, 0.1)
    assert 0.8 * 10 * awake < held < 10 * awake


def test_resident_tenants_count_the_tail_and_the_formulas_count_only_them() -> None:
    w = replace(default_workload(55, 100), active_fraction=modeled(0.1, "fraction", "--active-fraction"))
    assert resident_tenants(w) == 12  # 5.5 awake on average; 12 so that 99 wakes in 100 find room
    fit = evaluate(w, _sku("Medium"))
    gpu = next(f for f in fit.formulas if f.resource == "gpuMemory")
    assert "awake_at_once(tenants, active_fraction)" in gpu.expression
    assert gpu.substituted.startswith("1.5 * 12 *")
    assert resident_tenants(default_workload(55, 100)) == 55  # nothing sleeps by default


REPO = Path(__file__).resolve().parents[2]


def _sleep_activity() -> ModuleType:
    """bench/sleep_activity.py: the independent activity process bench_sleep.py measures with."""
    spec = importlib.util.spec_from_file_location("sleep_activity", REPO / "bench" / "sleep_activity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_swap_onset_is_one_past_the_most_tenants_that_fit() -> None:
    assert tenants_with_sleep(8, 0.1) == 32 and swap_onset(8, 0.1) == 33
    assert awake_at_once(swap_onset(8, 0.1), 0.1) > 8 >= awake_at_once(tenants_with_sleep(8, 0.1), 0.1)


def test_independent_tenants_on_the_runtime_ledger_swap_within_15_percent_of_the_predicted_onset() -> None:
    """A small seeded run of bench_sleep.py's process (each tenant awake 10% of the time on its own,
    not the planner's sets) through the runtime's Residency: 15% below the predicted onset at most
    1% of wakes find the room full, 15% above more do. The mean model's 81 fails both ways."""
    activity_module = _sleep_activity()
    activity = activity_module.Activity(0.1, 0.5)
    predicted, cap = swap_onset(8, 0.1), 16 << 20
    shares = {}
    for n in (math.floor(predicted / 1.15), math.ceil(predicted * 1.15)):
        wakes = evicting = 0
        for seed in (1, 2, 3):  # pooled: one overflow evicts in bursts, so one short trace is noisy
            requests = activity_module.trace(n, activity, 1200.0, seed=seed)
            got = activity_module.replay(requests, n, activity, 1200.0, cap, 8 * cap)
            assert got.peak_reserved <= 8 * cap
            wakes, evicting = wakes + got.wakes, evicting + sum(got.wake_evicted)
        assert wakes > 3000
        shares[n] = evicting / wakes
    below, above = sorted(shares)
    assert shares[below] <= SWAP_TOLERANCE < shares[above], shares


def test_the_predicted_swap_onset_is_within_15_percent_of_the_recorded_measurement() -> None:
    """Fed the recorded run (as `tensorwasm plan --bench-results bench/results` reads it): the fewest
    tenants from which more than 1% of wakes found the room full, with independent tenants on the
    runtime's ledger (bench_sleep.py's onset scan), in a room for `resident` awake tenants."""
    evidence = read_bench_results(REPO / "bench" / "results")
    measured = evidence.lookup("swap_onset")
    assert measured is not None, "no density_onset_measured_tenants in bench/results (bench_sleep.py)"
    resident = evidence.in_same_file(measured.origin, "resident_tenants")
    fraction = evidence.in_same_file(measured.origin, "active_fraction")
    assert resident is not None and fraction is not None
    predicted = swap_onset(int(resident), fraction)
    assert abs(predicted - measured.value) <= 0.15 * measured.value, (predicted, measured)
    figures = json.loads((REPO / "bench" / measured.origin.split(":")[0]).read_text())["figures"]
    mean_onset = figures["density_mean_model_onset_tenants"]  # the old model, ceil(n * f) > room
    assert abs(mean_onset - measured.value) > 0.15 * measured.value  # the run can tell them apart


def test_plan_with_bench_results_checks_the_model_against_the_recorded_onset(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tensorwasm.cli.main import main

    results = REPO / "bench" / "results"
    sleepy = ["plan", "--tenants", "500", "--active-fraction", "10%", "--bench-results", str(results)]
    assert main(sleepy) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("Model check (idle sleep)"))
    measured = read_bench_results(results).lookup("swap_onset")
    assert measured is not None and f"predicted {swap_onset(8, 0.1)} tenants" in line
    assert f"measured {measured.value:g}" in line and measured.origin in line
    assert "independent" in line and "residency ledger" in line
    assert main(["plan", "--tenants", "500", "--bench-results", str(results)]) == 0  # none sleeps: no check
    assert "Model check" not in capsys.readouterr().out
