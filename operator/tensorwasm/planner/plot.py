"""PNG of tenants-per-host curves, one panel per SLO, one line per SKU.

Each panel tells modeled from measured (a line from the model, filled dots where a benchmark
measured the cell), marks the asked workload (a star at the asked req/s and tenants), and carries
its own legend.

Owns the only matplotlib import in the planner (Agg backend, no display), loaded lazily so the
rest of the planner works without the `planner` extra. Returns PNG bytes; the CLI writes them.
"""

from __future__ import annotations

import io
from typing import Any

from tensorwasm.planner.curves import Curves


def curves_png(c: Curves, title: str, asked: tuple[float, float] | None = None) -> bytes:
    """`asked`: (aggregate req/s, tenants) of the workload asked about, starred in every panel."""
    from matplotlib import pyplot as plt

    fig = curves_figure(c, title, asked)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def curves_figure(c: Curves, title: str, asked: tuple[float, float] | None = None) -> Any:
    """The matplotlib Figure curves_png renders (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(c.slos), figsize=(5 * len(c.slos), 4), sharey=True, squeeze=False)
    for ax, slo in zip(axes[0], c.slos, strict=True):
        for sku in c.skus:
            cells = c.cells[(slo.id, sku.name)]
            qps, tenants = [x.qps for x in cells], [x.tenants for x in cells]
            (line,) = ax.step(qps, tenants, where="post", label=f"{sku.name} (modeled)")
            measured = [x for x in cells if x.source == "measured"]
            if measured:
                ax.scatter([x.qps for x in measured], [x.tenants for x in measured], marker="o", s=16,
                           color=line.get_color(), label=f"{sku.name} (measured)")  # fmt: skip
        if asked is not None:
            ax.scatter([asked[0]], [asked[1]], marker="*", s=160, color="crimson", zorder=5,
                       label=f"asked: {asked[1]:g} tenants at {asked[0]:g} req/s")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_title(slo.title, fontsize=10)
        ax.set_xlabel("aggregate req/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("max tenants per host")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
