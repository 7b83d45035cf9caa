"""Issue 12's operator before/after: the landed base's operator against this tree's, same harness.

Only the operator process comes from the base: its `operator/` source root goes first on that
process's PYTHONPATH (the base had no `tensorwasm.api`; its operator imports only its own
`tensorwasm.operator`, `tensorwasm.planner` and `tensorwasm.quantity`). The control plane, the CRDs,
the two runtime shards and the clocks are this tree's (bench_operator.compare_operators), so the
difference between the two rows is the operator's. Runs alternate (base, head, then head, base, ...)
on one control plane, with a plain create of the same List per round as the floor.

    python bench/operator_vs_base.py --tenants 100 --rounds 3   # git worktree of the base made if missing

Writes bench/results/operator_vs_base-<tenants>.json and re-renders docs/performance.md. Not a
`bench_*.py`: `make bench` does not run it (it needs the base checkout).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import bench_operator  # noqa: E402
import run as bench_run  # noqa: E402

BASE = "1604a50"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT.parent, capture_output=True, text=True, check=True).stdout


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def summarize(folder: Path, n: int, top: int = 25) -> None:
    """Inclusive samples per function (file:function) of each py-spy file, per tenant, biggest first."""
    for path in sorted(folder.glob("*.txt")):
        inclusive: Counter[str] = Counter()
        total = 0
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            total += int(count)
            frames = {re.sub(r" \(([^)]*/)?([^/)]+?)(:\d+)?\)$", r" (\2)", f) for f in stack.split(";")}
            for frame in frames:
                inclusive[frame] += int(count)
        print(f"== {path.name}: {total} samples (200/s), {total / 200 / n * 1000:.1f} ms per tenant")
        for frame, samples in inclusive.most_common(top):
            print(
                f"  {samples / 200 / n * 1000:7.2f} ms/tenant  {100 * samples / max(total, 1):5.1f}%  {frame}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", default=BASE, help="the base commit")
    parser.add_argument("--base-tree", type=Path, default=Path("/tmp/tensorwasm-operator-base"))
    parser.add_argument("--load-note", default="", help="what else the machine was doing, for the notes")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy each operator run into DIR and print where its CPU went (no results)",
    )
    args = parser.parse_args()
    if args.profile:
        os.environ["TENSORWASM_BENCH_OPERATOR_PYSPY"] = str(args.profile)
    if not (args.base_tree / "operator" / "tensorwasm").is_dir():
        _git("worktree", "add", "--detach", str(args.base_tree), args.base)
    base_sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=args.base_tree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    head_sha = _git("rev-parse", "--short", "HEAD").strip()
    base_label, head_label = f"base {base_sha}", f"head {head_sha}"
    trees = {base_label: {"PYTHONPATH": str(args.base_tree / "operator")}, head_label: {}}
    started = time.time()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    result = bench_operator.compare_operators(trees, args.tenants, args.rounds)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    rows = result["rows"]
    n = args.tenants
    if args.profile:
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "requests"}))
        summarize(args.profile, n)
        return 0
    columns = (
        "placed_s", "ready_s", "operator_cpu_s", "operator_writes", "api_writes_per_tenant",
        "api_requests_per_tenant", "apiserver_cpu_s", "rss_mib",
    )  # fmt: skip
    table = (
        f"| round | tree | all Placed s | all Ready s | operator CPU s | operator writes | API writes/tenant "
        f"| API requests/tenant | kube-apiserver CPU s | operator RSS MiB |\n|{'---|' * 10}\n"
        + "\n".join(
            f"| {r['round']} | {r['tree']} | " + " | ".join(str(r.get(c, "")) for c in columns) + " |"
            for r in rows
        )
        + "\n\nOperator write counters (its own count) and the API server's requests of at least 0.1 per "
        "tenant, each run:\n\n"
        + "\n".join(
            f"- round {r['round']} {r['tree']}: {r['writes']}; {r['requests']}" for r in rows if "writes" in r
        )
    )
    figures: dict[str, Any] = {}
    for label, key in ((base_label, "base"), (head_label, "head")):
        mine = [r for r in rows if r["tree"] == label]
        for column in ("placed_s", "ready_s", "operator_cpu_s", "operator_writes", "api_writes_per_tenant"):
            figures[f"{key}_{column}"] = _median(mine, column)
    figures["create_s"] = _median([r for r in rows if r["tree"] == "plain create"], "placed_s")
    for column in ("placed_s", "ready_s", "operator_cpu_s"):
        b, h = figures[f"base_{column}"], figures[f"head_{column}"]
        figures[f"head_over_base_{column}"] = round(h / b, 2) if b and h else None
    record = {
        "name": f"operator_vs_base-{n}",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": round(time.time() - started, 1),
        "hardware": bench_run.hardware(),
        "versions": bench_run.versions(),
        "title": f"Operator: {n} Tenants, the landed base's operator vs this session's head (issue 12)",
        "figures": {k: v for k, v in figures.items() if v is not None},
        "table": table,
        "notes": (
            f"bench/operator_vs_base.py --tenants {n} --rounds {args.rounds}: the operator process of "
            f"{base_label} (its operator/ source root first on the operator's PYTHONPATH) and of "
            f"{head_label}, each in a fresh namespace with 2 CPU runtime shards of head, on one local "
            "control plane of head started empty (bench_operator's harness: one `kubectl apply` of an "
            f"{n}-item List, one `kubectl get --watch` for the clocks, the API server quiet between runs), "
            "alternating base, head / head, base by round, a plain create of the same List per round as "
            "the floor. operator CPU s: the operator process from the apply until all Ready (the figure "
            "that survives a busy box); operator writes: its own write counter for the whole run "
            "(placement, deletion included); API writes/requests per tenant: every client's, from "
            "apiserver_request_total in the same window. A run not all Ready 120 s after all Placed "
            f"has no Ready time. Load average before {'/'.join(load_before)}, after "
            f"{'/'.join(load_after)} (1/5/15 min). {args.load_note}"
        ),
    }
    out = bench_run.RESULTS / f"operator_vs_base-{n}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    bench_run.PAGE.write_text(bench_run.render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
