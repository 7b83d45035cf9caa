"""Tenants per GPU, measured: 1 / 100 / 500 / 1,000 tenants in one runtime shard process.

Each tenant is bench/fixtures/gpu_step.wat with its own capped GPU pool, stream, a warm instance and a
4 KiB GPU buffer allocated by its tw_init (one 2 MiB pool page). For each count: the time from process
start to /readyz 200 (every tenant loaded), the process's RSS, the GPU memory in use (nvidia-smi,
before vs after), and an open-loop load of `step` (vector_add + stream sync over HTTP, every tenant
in turn) at a fixed aggregate rate, latency from each request's intended send time. At the largest
count the rate is raised until the P99 passes the SLO or a request fails: where it breaks.
Per-tenant figures are the slope between the 1-tenant run and each count. The planner's modeled
per-tenant GPU term (`tensorwasm plan`, context_overhead + gpu_working_set) is shown beside it, and the
per-tenant figure measured at the smallest count, fed to the planner with --bench-results, predicts
the largest count (goal: within 15%). Counts: TENSORWASM_BENCH_DENSITY_TENANTS.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MiB = 1 << 20
SLO_P99_MS = 100.0  # the seeds' invoke target (P95 <= 100 ms), applied to the P99
RATE = 2000.0  # aggregate req/s of the load at each count
RAMP = (2500.0, 3000.0, 4000.0, 6000.0)  # then, at the largest count, until the SLO breaks
GPU_TOTAL_MIB_H200 = 143771  # nvidia-smi memory.total of the GPU machine; read again below when possible
GPU_WORKING_SET = 2 * MiB  # one pool page per tenant (the 4 KiB buffer is charged a whole page)


def _helpers() -> Any:
    spec = importlib.util.spec_from_file_location(
        "bench_gpu_http", Path(__file__).with_name("bench_gpu_http.py")
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nvidia_smi_mib(field: str) -> float | None:
    """GPU 0's `memory.used` or `memory.total` in MiB as nvidia-smi reports it; None without a GPU."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        return float(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _planner_gpu_per_tenant(tenants: int, results_dir: Path | None) -> tuple[float, str]:
    """(context_overhead + gpu_working_set) in bytes as `tensorwasm plan` models it, and the term's source."""
    cmd = [sys.executable, "-m", "tensorwasm.cli.main", "plan", "--tenants", str(tenants),
           "--gpu-working-set", f"{GPU_WORKING_SET // MiB}Mi", "--sku", "Large", "--json"]  # fmt: skip
    if results_dir is not None:
        cmd += ["--bench-results", str(results_dir)]
    # Exit status 1 means "no single host fits" (1,000 tenants pass the Large SKU's ceiling of 500);
    # the JSON plan is printed all the same.
    doc = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=False).stdout)
    formula = next(f for f in doc["skus"][0]["formulas"] if f["resource"] == "gpuMemory")
    overhead = formula["terms"]["context_overhead"]
    return overhead["value"] + formula["terms"]["gpu_working_set"]["value"], overhead["source"]


def planner_figures(
    gpu_small: float, gpu_large: float, base_gpu: float, large: int, work: Path
) -> dict[str, float]:
    """The planner beside the measurement: its modeled per-tenant GPU term, and its prediction for
    `large` tenants once fed the per-tenant overhead measured at the smallest count (--bench-results;
    the figure goes under both names the planner reads: with MPS and without)."""
    modeled_pt, _ = _planner_gpu_per_tenant(large, None)
    results = work / "planner-results"
    results.mkdir(exist_ok=True)
    overhead = max(0.0, gpu_small - GPU_WORKING_SET)
    fed = {"mps_client_overhead_bytes": overhead, "context_overhead_bytes": overhead}
    (results / "density.json").write_text(json.dumps({"figures": fed}))
    fed_pt, fed_src = _planner_gpu_per_tenant(large, results)
    predicted = base_gpu + large * fed_pt
    measured = base_gpu + large * gpu_large
    return {
        "planner_modeled_gpu_mib_per_tenant": round(modeled_pt / MiB, 3),
        "modeled_over_measured_gpu_per_tenant": round(modeled_pt / gpu_large, 2),
        "mps_client_overhead_bytes": round(overhead),
        "context_overhead_bytes": round(overhead),
        f"planner_fed_gpu_mib_{large}t": round(predicted / MiB, 1),
        f"planner_fed_error_pct_{large}t": round(100 * (predicted - measured) / measured, 2),
        "planner_fed_term_measured": 1.0 if fed_src == "measured" else 0.0,
    }


def _under_mps(h: Any, count: int, procs: int, accelerator: str, work: Path) -> tuple[dict[str, float], str]:
    """`count` tenants split over `procs` shard processes, each an MPS client of one control daemon
    this benchmark starts: memory, start-up, and the aggregate rate the processes hold within the SLO."""
    from tensorwasm.runtime.accel import mps

    key = f"{count}t_{procs}mps"
    if mps.find_control_binary() is None:
        return {
            f"mps_skipped_{key}": 1.0
        }, f"| {count} in {procs} MPS processes | not run: no MPS control binary |"
    daemon = mps.MpsDaemon(work / "mps-pipe", work / "mps-log")
    daemon.start()
    runtimes = []
    figures: dict[str, float] = {}
    try:
        before = _nvidia_smi_mib("memory.used")
        per = count // procs
        for k in range(procs):
            wd = work / f"mps-{k}"
            wd.mkdir()
            env = mps.build_client_env(daemon.pipe_dir, log_dir=daemon.log_dir)
            runtimes.append(h.Runtime(h.write_tenants(wd, per, gpu_memory="4Mi"), accelerator, wd, env=env))
        after = _nvidia_smi_mib("memory.used")
        loaded = sum(len(rt.detail.get("loaded", [])) for rt in runtimes)
        rss = sum(rt.rss_bytes() for rt in runtimes)
        ready = max(rt.ready_s for rt in runtimes)
        gpu = (after - before) * MiB if after is not None and before is not None else 0.0
        targets = [(rt.port, [h.request_bytes("step", h.token(i)) for i in range(per)]) for rt in runtimes]
        best, p50_base, p99_base = 0.0, 0.0, 0.0
        for rate in (RATE, *RAMP, 8000.0, 12000.0):
            res = h.drive_targets(targets, threads=16, duration=3.0, rate=rate)
            errors = sum(n for c, n in res["status"].items() if c != 200)
            p50, p99 = h.pct(res["lat"], 0.5) / 1e3, h.pct(res["lat"], 0.99) / 1e3
            figures[f"mps_p99_ms_{int(rate)}rps_{key}"] = round(p99, 2)
            if rate == RATE:
                p50_base, p99_base = p50, p99
            if errors or p99 > SLO_P99_MS:
                break
            best = rate
        figures |= {
            f"mps_loaded_{key}": loaded, f"mps_ready_s_{key}": round(ready, 2),
            f"mps_rss_mib_{key}": round(rss / MiB, 1), f"mps_gpu_mib_{key}": round(gpu / MiB, 1),
            f"mps_gpu_mib_per_tenant_{key}": round(gpu / MiB / max(1, loaded), 3),
            f"mps_step_p50_ms_{key}": round(p50_base, 3), f"mps_step_p99_ms_{key}": round(p99_base, 3),
            f"mps_max_rate_at_slo_rps_{key}": best,
        }  # fmt: skip
        row = (
            f"| {count} in {procs} MPS processes | {loaded} / {count - loaded} | {ready:.1f} s (slowest) | "
            f"{rss / MiB:.0f} MiB | {gpu / MiB:.0f} MiB ({gpu / MiB / max(1, loaded):.2f} MiB/tenant) | "
            f"{RATE:.0f} | {p50_base:.2f} / {p99_base:.2f} | max {best:.0f} req/s at the SLO |"
        )
        return figures, row
    finally:
        for rt in runtimes:
            rt.stop()
        daemon.stop()


def run() -> dict[str, Any]:
    h = _helpers()
    # Without a GPU (`make bench` on a small box) the same code runs on fewer tenants.
    default = "100,500,1000" if _nvidia_smi_mib("memory.total") is not None else "20,100"
    counts = [int(c) for c in os.environ.get("TENSORWASM_BENCH_DENSITY_TENANTS", default).split(",")]
    accelerator = os.environ.get("TENSORWASM_BENCH_ACCELERATOR", "auto")
    work = Path(tempfile.mkdtemp(prefix="tw-bench-density-"))
    figures: dict[str, float] = {}
    rows = []
    base: dict[str, float] = {}
    per_tenant: dict[int, tuple[float, float | None]] = {}
    for count in [1, *counts]:
        before = _nvidia_smi_mib("memory.used")
        rt = h.Runtime(h.write_tenants(work, count, gpu_memory="4Mi"), accelerator, work)
        try:
            loaded, failed = len(rt.detail.get("loaded", [])), len(rt.detail.get("failed", {}))
            rss = rt.rss_bytes()
            after = _nvidia_smi_mib("memory.used")
            gpu = (after - before) * MiB if after is not None and before is not None else None
            if count == 1:
                base = {"rss": rss, "gpu": gpu or 0.0, "ready": rt.ready_s}
                continue
            rss_pt = (rss - base["rss"]) / (count - 1)
            gpu_pt = (gpu - base["gpu"]) / (count - 1) if gpu is not None else None
            load_pt = (rt.ready_s - base["ready"]) / (count - 1)
            per_tenant[count] = (rss_pt, gpu_pt)
            reqs = [h.request_bytes("step", h.token(i)) for i in range(count)]
            res = h.drive_processes(rt.port, reqs, processes=4, threads=16, duration=5.0, rate=RATE)
            errors = sum(n for c, n in res["status"].items() if c != 200)
            p50, p99 = h.pct(res["lat"], 0.5) / 1e3, h.pct(res["lat"], 0.99) / 1e3
            key = f"{count}t"
            figures |= {
                f"loaded_{key}": loaded, f"failed_{key}": failed,
                f"load_ms_per_tenant_{key}": round(load_pt * 1e3, 2),
                f"rss_mib_{key}": round(rss / MiB, 1), f"rss_kib_per_tenant_{key}": round(rss_pt / 1024, 1),
                f"step_p50_ms_{key}": round(p50, 3), f"step_p99_ms_{key}": round(p99, 3),
                f"step_errors_{key}": errors, f"step_rps_{key}": round(res["status"].get(200, 0) / 5.0, 1),
            }  # fmt: skip
            if gpu_pt is not None:
                figures[f"gpu_mib_{key}"] = round(gpu / MiB, 1)  # type: ignore[operator]
                figures[f"gpu_mib_per_tenant_{key}"] = round(gpu_pt / MiB, 3)
            rows.append(
                f"| {count} | {loaded} / {failed} | {rt.ready_s:.1f} s ({load_pt * 1e3:.2f} ms/tenant) | "
                f"{rss / MiB:.0f} MiB ({rss_pt / 1024:.0f} KiB/tenant) | "
                + (f"{gpu / MiB:.0f} MiB ({gpu_pt / MiB:.2f} MiB/tenant)" if gpu_pt is not None else "-")  # type: ignore[operator]
                + f" | {RATE:.0f} | {p50:.2f} / {p99:.2f} | {errors} |"
            )
            if count == max(counts):
                best = RATE if not errors and p99 <= SLO_P99_MS else 0.0
                for rate in RAMP if best else ():
                    res = h.drive_processes(rt.port, reqs, processes=4, threads=32, duration=3.0, rate=rate)
                    errors = sum(n for c, n in res["status"].items() if c != 200)
                    p99 = h.pct(res["lat"], 0.99) / 1e3
                    figures[f"ramp_p99_ms_{int(rate)}rps_{key}"] = round(p99, 2)
                    figures[f"ramp_rps_{int(rate)}rps_{key}"] = round(res["status"].get(200, 0) / 3.0, 1)
                    if errors or p99 > SLO_P99_MS:
                        break
                    best = rate
                figures[f"max_rate_at_slo_rps_{key}"] = best
        finally:
            rt.stop()
    small, large = min(per_tenant), max(per_tenant)
    gpu_large = per_tenant[large][1]
    if gpu_large:
        # Where memory would stop it (extrapolated from the measured slope, not loaded to the limit).
        total = (_nvidia_smi_mib("memory.total") or GPU_TOTAL_MIB_H200) * MiB
        figures["gpu_memory_ceiling_tenants"] = int((total - base["gpu"]) // gpu_large)
    # RSS of a 1-tenant process carries start-up noise of its own: the slope between counts is steadier.
    rss_slope = (figures[f"rss_mib_{large}t"] - figures[f"rss_mib_{small}t"]) * MiB / max(1, large - small)
    figures[f"rss_kib_per_tenant_{small}_to_{large}t"] = round(rss_slope / 1024, 1)
    figures["host_memory_ceiling_tenants_per_100gib"] = int((100 << 30) // max(1.0, rss_slope))
    gpu_small = per_tenant[small][1]
    if gpu_small is not None and gpu_large is not None:
        figures |= planner_figures(gpu_small, gpu_large, base["gpu"], large, work)
    else:
        figures["planner_modeled_gpu_mib_per_tenant"] = round(
            _planner_gpu_per_tenant(large, None)[0] / MiB, 3
        )
    mps_procs = int(os.environ.get("TENSORWASM_BENCH_DENSITY_MPS_PROCESSES", "0"))
    if mps_procs:
        mps_figures, mps_row = _under_mps(h, large, mps_procs, accelerator, work)
        figures |= mps_figures
        rows.append(mps_row)
    figures["tenants"] = large
    table = (
        "| tenants | loaded / failed | start to ready | host RSS | GPU memory | load req/s | "
        "step P50 / P99 ms | errors |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    return {
        "title": "Tenants per GPU, measured (one shard process)",
        "figures": figures,
        "targets": {f"planner_fed_error_pct_{large}t": "<= 15", f"loaded_{large}t": f">= {2 * 500}"},
        "table": table,
        "notes": (
            f"Accelerator {accelerator}. Each tenant: bench/fixtures/gpu_step.wat, gpuMemory cap 4Mi, one "
            "warm instance, one 4 KiB GPU buffer (a 2 MiB pool page). Per-tenant: slope from a 1-tenant run. "
            f"Load: open loop at {RATE:.0f} req/s over every tenant (4 processes x 16 connections, 5 s), "
            f"latency from the intended send time; at the largest count the rate is raised ({RAMP} req/s, "
            f"3 s each) until the P99 passes {SLO_P99_MS:.0f} ms or a request fails. Memory ceilings are "
            "extrapolated from the measured per-tenant slopes. The planner's "
            "modeled per-tenant GPU term (MPS client context 5Mi + gpu working set) is shown "
            "beside the measured one; fed the per-tenant overhead measured at the smallest count "
            "(--bench-results, figures mps_client_overhead_bytes / context_overhead_bytes), it predicts "
            "the largest (the unpadded term; the planner adds its 1.5x headroom on top). The seed's "
            "modeled table holds 500 tenants on its Large host (tenant ceiling)."
        ),
    }
