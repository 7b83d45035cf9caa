"""PNG of tenants-per-host curves, one panel per SLO, one line per SKU.

Owns the only matplotlib import in the planner (Agg backend, no display), loaded lazily so the
rest of the planner works without the `planner` extra. Returns PNG bytes; the CLI writes them.
"""

from __future__ import annotations

import io

from tensorwasm.planner.curves import Curves


def curves_png(c: Curves, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(c.slos), figsize=(5 * len(c.slos), 4), sharey=True, squeeze=False)
    for ax, slo in zip(axes[0], c.slos, strict=True):
        for sku in c.skus:
            cells = c.cells[(slo.id, sku.name)]
            ax.step([x.qps for x in cells], [x.tenants for x in cells], where="post", label=sku.name)
            measured = [x for x in cells if x.source == "measured"]
            if measured:
                ax.scatter([x.qps for x in measured], [x.tenants for x in measured], marker="o", s=12)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_title(slo.title, fontsize=10)
        ax.set_xlabel("aggregate req/s")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("max tenants per host")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
