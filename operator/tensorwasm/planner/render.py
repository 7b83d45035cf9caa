"""Plain-text rendering of plans, LLM budgets and goodput results (the CLI's default output).

Owns the table layout only; every number comes from the model objects. Pure string builders;
must not import matplotlib, argparse or do I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from tensorwasm.planner.curves import Curves
from tensorwasm.planner.figures import Figure, Formula
from tensorwasm.planner.goodput import Goodput, Replicas
from tensorwasm.planner.llm import LlmBudget
from tensorwasm.planner.model import Plan, SkuFit
from tensorwasm.planner.units import format_bytes, format_seconds


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def show(value: float, unit: str) -> str:
    if unit == "bytes":
        return format_bytes(value)
    if unit == "s":
        return format_seconds(value)
    if unit == "fraction":
        return f"{value:.0%}"
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return f"{text} {unit}".rstrip()


def _fig(f: Figure) -> str:
    return show(f.value, f.unit)


def _formula_rows(fit: SkuFit) -> list[list[str]]:
    rows = []
    for f in fit.formulas:
        headroom = f.available.value - f.required.value
        rows.append(
            [
                f.resource,
                _fig(f.required),
                _fig(f.available),
                show(headroom, f.available.unit)
                if headroom >= 0
                else "-" + show(-headroom, f.available.unit),
                f"{f.utilisation:.0%}",
                "yes" if f.fits else "NO",
            ]
        )
    return rows


def _terms(formulas: Sequence[Formula]) -> list[list[str]]:
    seen: dict[str, Figure] = {}
    for f in formulas:
        seen.update(f.terms)
    return [[name, _fig(fig), fig.source, fig.origin] for name, fig in seen.items()]


def render_plan(p: Plan, curves: Curves | None) -> str:
    out: list[str] = []
    w = p.workload
    out.append(f"Workload: {w.tenants.value:g} tenants, {w.qps.value:g} req/s aggregate")
    target = p.recommended or (p.sharded[0] if p.sharded else None)
    if p.recommended:
        b, sku = p.recommended.binding, p.recommended.sku
        out.append(
            f"Recommended SKU: {sku.name} ({sku.gpu.name}, {sku.vcpu} vCPU,"
            f" {format_bytes(sku.memory_bytes)} RAM)"
        )
        out.append(f"Binding bottleneck: {b.resource} at {b.utilisation:.0%} of the SKU")
    elif p.sharded:
        fit, hosts = p.sharded
        out.append(
            f"No single host fits. Shard: {hosts} x {fit.sku.name}, binding per host: {fit.binding.resource}"
        )
    else:
        out.append("No SKU fits, not even sharded: a single tenant exceeds every host")
    if target:
        title = "per host" if p.sharded else ""
        out += ["", f"Formulas on {target.sku.name} {title}".rstrip()]
        out += [f"  {f.resource:<10} {f.expression}\n  {'':<10} {f.substituted}" for f in target.formulas[:4]]
        out += [
            "",
            table(["resource", "required", "available", "headroom", "used", "fits"], _formula_rows(target)),
        ]
        out += ["", "Terms (measured = backed by bench results; modeled = assumption)"]
        out += [table(["term", "value", "source", "origin"], _terms(target.formulas))]
    out += ["", "All SKUs (smallest first)"]
    out.append(
        table(
            ["sku", "fits", "binding", "memory", "gpuMemory", "cpu", "diskIops"],
            [
                [fit.sku.name, "yes" if fit.fits else "no", fit.binding.resource]
                + [f"{f.utilisation:.0%}" for f in fit.formulas[:4]]
                for fit in p.fits
            ],
        )
    )
    applying = [t for t in p.triggers if t.applies]
    if applying:
        out += ["", "Re-plan when"]
        out += [f"  - {t.id}: {t.reason}" for t in applying]
    if curves:
        out += ["", render_curves(curves)]
    return "\n".join(out)


def render_curves(c: Curves) -> str:
    out = ["Tenants per host (0 = not servable at that load)"]
    for slo in c.slos:
        qps = [cell.qps for cell in c.cells[(slo.id, c.skus[0].name)]]
        rows = []
        for i, q in enumerate(qps):
            row = [f"{q:g}"]
            for sku in c.skus:
                cell = c.cells[(slo.id, sku.name)][i]
                row.append(f"{cell.tenants} ({cell.source})")
            rows.append(row)
        out += ["", f"SLO: {slo.title}", table(["req/s", *[s.name for s in c.skus]], rows)]
    return "\n".join(out)


def render_llm(b: LlmBudget) -> str:
    i = b.inputs
    tp = f" x TP{i.tensor_parallel}" if i.tensor_parallel > 1 else ""
    out = [
        f"Model {i.shape.name}: {i.shape.params / 1e9:.2f}B params, {i.shape.layers} layers, "
        f"{i.shape.attention_heads} heads / {i.shape.kv_heads} KV heads, head dim {i.shape.head_dim}",
        f"GPU {i.gpu_name}{tp}: {format_bytes(i.gpu_memory_bytes)}, {i.bandwidth_bytes_per_s / 1e9:g} GB/s"
        " (all figures modeled)",
        "",
    ]
    out += [f"  {f}" for f in b.formulas]
    out += ["", f"KV pool {format_bytes(b.kv_pool_bytes)} = {b.kv_tokens:,} tokens = {b.blocks:,} blocks", ""]
    out.append(
        table(
            ["context", "blocks/request", "max concurrent requests"],
            [[f"{r.context:,}", str(r.blocks_per_request), str(r.max_requests)] for r in b.contexts],
        )
    )
    out += ["", f"Decode roofline at context {b.decode[0].context:,}" if b.decode else ""]
    out.append(
        table(
            ["batch", "step", "tokens/s", "per request", "fits KV pool"],
            [
                [
                    str(r.batch),
                    format_seconds(r.step_s),
                    f"{r.tokens_per_s:,.0f}",
                    f"{r.per_request_tokens_per_s:,.1f}",
                    "yes" if r.fits_kv else "NO",
                ]
                for r in b.decode
            ],
        )
    )
    return "\n".join(out)


def render_goodput(g: Goodput, r: Replicas | None) -> str:
    out = [
        f"Targets: p95 <= {format_seconds(g.p95_target_s)}, p99 <= {format_seconds(g.p99_target_s)},"
        f" errors <= {g.error_budget:.2%}",
        "",
        table(
            ["load req/s", "p95", "p99", "errors", "meets"],
            [
                [
                    f"{p.load:g}",
                    format_seconds(p.p95_s),
                    format_seconds(p.p99_s),
                    f"{p.error_rate:.2%}",
                    "yes" if p.load <= g.goodput else "no",
                ]
                for p in g.points
            ],
        ),
        "",
        f"Goodput per replica: {g.goodput:g} req/s (measured)"
        + (
            f"; first violation {g.violation}"
            if g.first_violation
            else "; no measured load violated the targets"
        ),
    ]
    if r:
        out += [f"Replicas (modeled, {r.operating_margin:.0%} margin below the knee): {r.formula()}"]
    return "\n".join(out)
