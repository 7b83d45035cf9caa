"""The planner's plot: every panel marks the asked workload, tells modeled from measured, has a legend.

The real curves (the model, and a bench result making some cells measured) drawn by the real
matplotlib figure that `tensorwasm plan --plot` renders to PNG.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib import pyplot as plt

from tensorwasm.planner.bench import read_bench_results
from tensorwasm.planner.curves import tenants_per_host
from tensorwasm.planner.inputs import build_workload
from tensorwasm.planner.plot import curves_figure
from tensorwasm.planner.skus import reference_catalog

SKUS = reference_catalog().skus


def test_every_panel_stars_the_asked_point_and_labels_modeled_and_measured(tmp_path: Path) -> None:
    (tmp_path / "invoke.json").write_text(json.dumps({"title": "invoke", "figures": {
        "invoke_p95_us": 850.0, "invoke_cpu_us": 450.0, "tenants": 64, "qps": 2000}}))  # fmt: skip
    evidence = read_bench_results(tmp_path)
    workload = build_workload({"tenants": "40", "qps": "300"}, evidence)
    curves = tenants_per_host(workload, SKUS, evidence, gpu_time_s=100e-6)
    fig = curves_figure(curves, "t", asked=(workload.qps.value, workload.tenants.value))
    try:
        axes = fig.axes
        assert len(axes) == len(curves.slos) > 1
        for ax in axes:
            legend = ax.get_legend()
            assert legend is not None, ax.get_title()
            labels = [t.get_text() for t in legend.get_texts()]
            assert "asked: 40 tenants at 300 req/s" in labels
            assert {f"{sku.name} (modeled)" for sku in SKUS} <= set(labels)
            star = [c for c in ax.collections if c.get_label().startswith("asked")]
            assert [tuple(p) for p in star[0].get_offsets()] == [(300.0, 40.0)]
        measured = {label.get_text() for ax in axes for label in ax.get_legend().get_texts()}
        assert "Medium (measured)" in measured  # the bench result made Medium's cells measured
    finally:
        plt.close(fig)
