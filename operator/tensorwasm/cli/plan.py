"""`tensorwasm plan`: host sizing, tenants-per-host curves, LLM KV-cache budgets and goodput.

    tensorwasm plan --tenants 50 --qps 1000 [--sku Medium] [--json] [--plot curves.png]
    tensorwasm plan llm --model Llama-3-8B --gpu H100-80GB [--json]
    tensorwasm plan goodput --curve curve.json --p95 100ms --p99 250ms --peak-load 1200

Exit codes: 0 a plan was made; 1 nothing fits (or the chosen --sku does not); 2 bad input, with
the field named. Thin: parses flags, reads files, calls tensorwasm.planner, prints. Must not
import kopf or the runtime; matplotlib only for --plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tensorwasm.planner.skus import Catalog

EXIT_OK, EXIT_NO_FIT, EXIT_BAD_INPUT = 0, 1, 2

# Workload flags: dest == Workload field name, so the planner's input builder can name them back.
_WORKLOAD_FLAGS: tuple[tuple[str, str], ...] = (
    ("instances_per_tenant", "warm instances per tenant (its max concurrency; default 1)"),
    ("working_set", "resident bytes per warm instance: linear memory + Wasmtime overhead (default 16Mi)"),
    ("gpu_working_set", "GPU bytes per tenant (default 256Mi)"),
    ("cpu_per_request", "CPU time per request, e.g. 2ms (default 2ms; measured if bench results have it)"),
    ("target_utilisation", "CPU target utilisation, 0.6 or 60%% (default 60%%)"),
    ("cuda_context", "GPU bytes per CUDA context per instance without MPS (default 30Mi)"),
    ("mps_client_overhead", "GPU bytes per tenant with MPS (default 5Mi)"),
    ("runtime", "OS + runtime budget (default 1Gi)"),
    ("snapshot_ops", "snapshot captures + restores per second, all tenants (default tenants/60)"),
    ("audit_writes", "audit-log writes per second (default: one per request)"),
    ("background_iops", "metrics scrape + OS background IOPS (default 100)"),
    ("snapshots_in_flight", "concurrent snapshot captures/restores (default: the SKU's)"),
    ("snapshot_payload", "largest snapshot payload (default: the SKU's)"),
    ("active_fraction", "share of tenants awake at once when idle ones sleep, 0.1 or 10%% (default: all)"),
)


def register(subparsers: Any) -> None:
    plan = subparsers.add_parser(
        "plan",
        allow_abbrev=False,  # "plan llm --gpu" must not read as an abbreviation of "plan --gpu-time-..."
        help="size hosts for tenants (SKU advice, curves), LLM KV-cache budgets, goodput",
        description="Size a host for N tenants against the capacity model. Sizes and times need units.",
    )
    plan.add_argument("--tenants", help="active tenants one host must hold (required)")
    plan.add_argument("--qps", help="aggregate requests per second (default: 1 per tenant)")
    for dest, text in _WORKLOAD_FLAGS:
        plan.add_argument("--" + dest.replace("_", "-"), dest=dest, help=text)
    plan.add_argument("--mps", choices=("on", "off", "sku"), default="sku", help="MPS (default: the SKU's)")
    plan.add_argument(
        "--gpu-time-per-request", help="GPU busy time per request for the GPU SLO (default 100us)"
    )
    plan.add_argument("--sku", help="evaluate only this SKU")
    plan.add_argument(
        "--skus-file", type=Path, help="YAML with more SKUs (and GPUs), same shape as skus.yaml"
    )
    plan.add_argument(
        "--bench-results", type=Path, help="bench/results directory: its figures become measured"
    )
    plan.add_argument("--json", action="store_true", help="print JSON instead of tables")
    plan.add_argument("--plot", type=Path, help="write a PNG of tenants-per-host curves per SLO")
    plan.set_defaults(handler=run_plan)
    sub = plan.add_subparsers(dest="plan_command", metavar="MODE")

    llm = sub.add_parser(
        "llm",
        allow_abbrev=False,
        help="KV-cache budget, blocks, max concurrency and decode roofline for an LLM",
    )
    llm.add_argument(
        "--model", help="preset: Llama-2-7B, Llama-2-70B, Llama-3-8B, Llama-3-70B, Mistral-7B, Qwen2-7B"
    )
    for flag, text in (
        ("--params", "parameter count, e.g. 8.03e9 (custom shape)"),
        ("--layers", "transformer layers"),
        ("--attention-heads", "query heads"),
        ("--kv-heads", "key/value heads (GQA)"),
        ("--head-dim", "dimension per head"),
        ("--max-context", "the model's context window"),
    ):
        llm.add_argument(flag, help=text)
    llm.add_argument(
        "--weight-dtype", default="bf16", help="fp32, fp16, bf16, fp8, int8, int4 (default bf16)"
    )
    llm.add_argument("--kv-dtype", default="fp16", help="KV-cache dtype (default fp16)")
    llm.add_argument("--gpu", default="H100-80GB", help="GPU from the SKU catalog (default H100-80GB)")
    llm.add_argument("--gpu-memory", help="override the GPU's memory, e.g. 80GB")
    llm.add_argument("--bandwidth", help="override the GPU's memory bandwidth, e.g. 3.35TB/s")
    llm.add_argument("--overhead", default="2GiB", help="CUDA context + serving framework (default 2GiB)")
    llm.add_argument("--activations", default="2GiB", help="activation workspace (default 2GiB)")
    llm.add_argument("--block-size", default="16", help="tokens per KV block (default 16)")
    llm.add_argument("--contexts", default="512,1024,2048,4096,8192", help="context lengths, comma separated")
    llm.add_argument("--batches", default="1,8,32,64", help="decode batch sizes for the roofline")
    llm.add_argument("--tp", default="1", help="tensor-parallel degree (per-GPU figures)")
    llm.add_argument("--skus-file", type=Path, help="YAML with more GPUs")
    llm.add_argument("--json", action="store_true", help="print JSON instead of tables")
    llm.set_defaults(handler=run_llm)

    good = sub.add_parser(
        "goodput", allow_abbrev=False, help="highest load meeting p95/p99 targets, and replicas with reserve"
    )
    good.add_argument("--curve", type=Path, help="latency-vs-load curve: CSV or JSON (see docs)")
    good.add_argument(
        "--bench-results", type=Path, help="use the first results file in DIR that holds a curve"
    )
    good.add_argument("--p95", required=True, help="p95 latency target, e.g. 100ms")
    good.add_argument("--p99", required=True, help="p99 latency target, e.g. 250ms")
    good.add_argument("--error-budget", default="1%", help="highest acceptable error rate (default 1%%)")
    good.add_argument("--peak-load", help="peak demand in req/s: compute replicas")
    good.add_argument(
        "--margin", default="10%", help="operating margin below the measured goodput (default 10%%)"
    )
    good.add_argument("--failure-reserve", default="1", help="replicas kept for failures (default 1: N+1)")
    good.add_argument("--rollout-surge", default="25%", help="extra replicas during a rollout (default 25%%)")
    good.add_argument("--json", action="store_true", help="print JSON instead of tables")
    good.set_defaults(handler=run_goodput)


def _fail(message: str) -> int:
    print(f"tensorwasm plan: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _catalog(skus_file: Path | None) -> Catalog:
    from tensorwasm.planner.errors import PlanInputError
    from tensorwasm.planner.skus import parse_catalog, reference_catalog

    catalog = reference_catalog()
    if skus_file is None:
        return catalog
    try:
        text = skus_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanInputError("--skus-file", f"cannot read {skus_file}: {exc.strerror}") from exc
    return parse_catalog(text, base=catalog, source=str(skus_file))


def run_plan(args: argparse.Namespace) -> int:
    from tensorwasm.planner.errors import PlanInputError

    try:
        return _plan(args)
    except PlanInputError as exc:
        return _fail(str(exc))


def _plan(args: argparse.Namespace) -> int:
    from tensorwasm.planner.bench import NO_EVIDENCE, read_bench_results
    from tensorwasm.planner.curves import tenants_per_host
    from tensorwasm.planner.errors import PlanInputError
    from tensorwasm.planner.inputs import build_workload, gpu_time_per_request
    from tensorwasm.planner.model import plan, size_order
    from tensorwasm.planner.render import render_plan

    catalog = _catalog(args.skus_file)
    evidence = read_bench_results(args.bench_results) if args.bench_results else NO_EVIDENCE
    raw = {"tenants": args.tenants, "qps": args.qps} | {d: getattr(args, d) for d, _ in _WORKLOAD_FLAGS}
    workload = build_workload(raw, evidence, mps={"on": True, "off": False}.get(args.mps))
    only = catalog.sku(args.sku) if args.sku else None
    result = plan(workload, catalog.skus, only=only)
    gpu_time = gpu_time_per_request(args.gpu_time_per_request, evidence)
    skus = tuple(size_order(catalog.skus))
    curves = tenants_per_host(workload, skus, evidence, gpu_time_s=gpu_time.value)
    if args.plot:
        from tensorwasm.planner.plot import curves_png

        png = curves_png(
            tenants_per_host(workload, skus, evidence, gpu_time_s=gpu_time.value, qps_points=_plot_grid()),
            f"Tenants per host ({workload.working_set.value / (1 << 20):g} MiB working set,"
            f" {workload.gpu_working_set.value / (1 << 20):g} MiB GPU,"
            f" {workload.cpu_per_request.value * 1e3:g} ms CPU per request)",
            asked=(workload.qps.value, workload.tenants.value),
        )
        try:
            args.plot.write_bytes(png)
        except OSError as exc:
            raise PlanInputError("--plot", f"cannot write {args.plot}: {exc.strerror}") from exc
    if args.json:
        doc = result.to_json() | {"gpuTimePerRequest": gpu_time.to_json(), "tenantsPerHost": curves.to_json()}
        print(json.dumps(doc, indent=2, default=_json_default))
    else:
        print(render_plan(result, curves))
        onset = _swap_onset_check(workload, evidence)
        if onset:
            print(onset)
        if args.plot:
            print(f"\nWrote {args.plot}")
    return EXIT_OK if result.recommended or (result.sharded and not only) else EXIT_NO_FIT


def _swap_onset_check(workload: Any, evidence: Any) -> str:
    """With --active-fraction and a recorded swap onset in --bench-results: the model's onset for that
    run's room and active share beside the onset the run measured (bench_sleep.py's onset scan:
    tenants awake independently, drawn by bench/sleep_activity.py, fed to the runtime's ledger)."""
    from tensorwasm.planner.model import SWAP_TOLERANCE, swap_onset

    if workload.active_fraction is None:
        return ""
    measured = evidence.lookup("swap_onset")
    if measured is None:
        return ""
    resident = evidence.in_same_file(measured.origin, "resident_tenants")
    fraction = evidence.in_same_file(measured.origin, "active_fraction")
    if resident is None or fraction is None:
        return ""
    predicted = swap_onset(int(resident), fraction)
    off = abs(predicted - measured.value) / measured.value
    return (
        f"Model check (idle sleep): room for {resident:g} awake, each tenant awake {fraction:.0%} of the"
        f" time independently; swap onset (more than {SWAP_TOLERANCE:.0%} of wakes find the room full)"
        f" predicted {predicted} tenants, measured {measured.value:g} ({measured.origin}: seeded"
        f" independent tenants replayed on the runtime's residency ledger, bench_sleep.py), {off:.0%} off"
    )


def _plot_grid() -> tuple[float, ...]:
    from tensorwasm.planner.curves import log_grid

    return log_grid()


def _json_default(value: object) -> object:
    raise TypeError(f"not JSON serialisable: {value!r}")


def run_llm(args: argparse.Namespace) -> int:
    from tensorwasm.planner.errors import PlanInputError

    try:
        return _llm(args)
    except PlanInputError as exc:
        return _fail(str(exc))


def _ints(field: str, text: str, maximum: float) -> tuple[int, ...]:
    from tensorwasm.planner.units import parse_number

    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        from tensorwasm.planner.errors import PlanInputError

        raise PlanInputError(field, "needs at least one value")
    return tuple(int(parse_number(field, p, minimum=1, maximum=maximum, integer=True)) for p in parts)


def _llm(args: argparse.Namespace) -> int:
    from tensorwasm.planner.errors import PlanInputError
    from tensorwasm.planner.llm import LlmInputs, ModelShape, budget, preset
    from tensorwasm.planner.render import render_llm
    from tensorwasm.planner.units import parse_bandwidth, parse_bytes, parse_number

    custom = [args.params, args.layers, args.attention_heads, args.kv_heads, args.head_dim]
    if args.model:
        shape = preset(args.model)
    elif all(v is not None for v in custom):
        shape = ModelShape(
            name="custom",
            params=parse_number("--params", args.params, minimum=1, maximum=1e13),
            layers=int(parse_number("--layers", args.layers, minimum=1, maximum=1000, integer=True)),
            attention_heads=int(
                parse_number("--attention-heads", args.attention_heads, minimum=1, integer=True)
            ),
            kv_heads=int(parse_number("--kv-heads", args.kv_heads, minimum=1, integer=True)),
            head_dim=int(parse_number("--head-dim", args.head_dim, minimum=1, integer=True)),
            max_context=int(
                parse_number("--max-context", args.max_context or "8192", minimum=1, integer=True)
            ),
        )
    else:
        names = ("--params", "--layers", "--attention-heads", "--kv-heads", "--head-dim")
        missing = next(n for n, v in zip(names, custom, strict=True) if v is None)
        raise PlanInputError(missing, "is required for a custom shape (or pick a preset with --model)")
    catalog = _catalog(args.skus_file)
    gpu = catalog.gpus.get(args.gpu)
    if gpu is None and not (args.gpu_memory and args.bandwidth):
        known = ", ".join(catalog.gpus)
        raise PlanInputError(
            "--gpu", f"unknown GPU {args.gpu!r}; one of {known}, or --gpu-memory and --bandwidth"
        )
    inputs = LlmInputs(
        shape=shape,
        weight_dtype=args.weight_dtype,
        kv_dtype=args.kv_dtype,
        gpu_name=args.gpu,
        gpu_memory_bytes=parse_bytes("--gpu-memory", args.gpu_memory, allow_zero=False)
        if args.gpu_memory or gpu is None
        else gpu.memory_bytes,
        bandwidth_bytes_per_s=parse_bandwidth("--bandwidth", args.bandwidth)
        if args.bandwidth or gpu is None
        else gpu.bandwidth_bytes_per_s,
        overhead_bytes=parse_bytes("--overhead", args.overhead),
        activation_bytes=parse_bytes("--activations", args.activations),
        block_size=int(parse_number("--block-size", args.block_size, minimum=1, maximum=4096, integer=True)),
        contexts=_ints("--contexts", args.contexts, 10_000_000),
        batches=_ints("--batches", args.batches, 100_000),
        tensor_parallel=int(parse_number("--tp", args.tp, minimum=1, maximum=64, integer=True)),
    )
    result = budget(inputs)
    print(json.dumps(result.to_json(), indent=2) if args.json else render_llm(result))
    return EXIT_OK


def run_goodput(args: argparse.Namespace) -> int:
    from tensorwasm.planner.errors import PlanInputError

    try:
        return _goodput(args)
    except PlanInputError as exc:
        return _fail(str(exc))


def _goodput(args: argparse.Namespace) -> int:
    from tensorwasm.planner.errors import PlanInputError
    from tensorwasm.planner.goodput import find_goodput, parse_curve, replicas
    from tensorwasm.planner.render import render_goodput
    from tensorwasm.planner.units import parse_fraction, parse_number, parse_seconds

    if args.curve is not None:
        sources = [args.curve]
    elif args.bench_results is not None:
        if not args.bench_results.is_dir():
            raise PlanInputError("--bench-results", f"{args.bench_results} is not a directory")
        sources = sorted(args.bench_results.glob("*.json"))
    else:
        raise PlanInputError("--curve", "is required (or --bench-results DIR holding a curve)")
    points = None
    for path in sources:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PlanInputError("--curve", f"cannot read {path}: {exc.strerror}") from exc
        try:
            points = parse_curve(text, str(path))
            break
        except PlanInputError:
            if args.curve is not None:
                raise
    if points is None:
        raise PlanInputError(
            "--bench-results", f"no results file in {args.bench_results} holds a latency curve"
        )
    result = find_goodput(
        points,
        parse_seconds("--p95", args.p95),
        parse_seconds("--p99", args.p99),
        parse_fraction("--error-budget", args.error_budget, allow_zero=True),
    )
    reps = None
    if args.peak_load is not None:
        reps = replicas(
            result.goodput,
            parse_number("--peak-load", args.peak_load, minimum=0, maximum=1e9),
            operating_margin=parse_fraction("--margin", args.margin, allow_zero=True),
            failure_reserve=int(
                parse_number("--failure-reserve", args.failure_reserve, maximum=1000, integer=True)
            ),
            rollout_surge=parse_fraction("--rollout-surge", args.rollout_surge, allow_zero=True),
        )
    if args.json:
        print(json.dumps(result.to_json() | {"replicas": reps.to_json() if reps else None}, indent=2))
    else:
        print(render_goodput(result, reps))
    return EXIT_OK if result.goodput > 0 else EXIT_NO_FIT
