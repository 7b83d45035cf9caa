"""The engine on its two wasmtime layers: the direct C path (private) vs wasmtime-py's public API.

One process, one engine per layer, the same modules, interleaved in rounds so machine noise hits both
alike (per-call perf_counter_ns, CPU time per call from process_time_ns over each block):
- `noop`: TenantInstancePool.invoke("noop", b"") — the whole invoke a request pays, reset included.
- `echo64`: the same with 64 input bytes (adds the tw_alloc call and the copies in and out).
- `host calls`: one invoke whose guest makes 16 `tensorwasm.log` host calls (level debug, dropped).
- floor: wasmtime-py's `Func.__call__` on the same noop export with no pool and no reset, which the
  public layer cannot go below (it calls exactly that, plus our slot handling).
The public layer is the fallback for a wasmtime-py upgrade that breaks the private one
(engine/lowlevel.py); this says what running on it costs.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import wasmtime

from tensorwasm.runtime.engine import Engine, GuestLimits, TenantInstancePool

ROUNDS, PER_ROUND, WARM = 8, 1500, 300
PAYLOAD = bytes(64)
GUEST = b"""(module
  (import "tensorwasm" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "x")
  (func (export "tw_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "noop") (param i32 i32) (result i64) (i64.const 0))
  (func (export "echo") (param i32 i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get 0)) (i64.const 32)) (i64.extend_i32_u (local.get 1))))
  (func (export "chatty") (param i32 i32) (result i64) (local $i i32)
    (loop $l
      (call $log (i32.const 0) (i32.const 16) (i32.const 1))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 16))))
    (i64.const 0)))"""


def _pct(samples: list[int], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0  # ns -> us


def _block(fn: Callable[[], Any], n: int, wall: list[int], cpu: list[float]) -> None:
    clock, cpu_clock = time.perf_counter_ns, time.process_time_ns
    c0 = cpu_clock()
    for _ in range(n):
        t0 = clock()
        fn()
        wall.append(clock() - t0)
    cpu.append((cpu_clock() - c0) / n / 1000.0)


def run() -> dict[str, Any]:
    load = " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    engines = {layer: Engine(wasmtime_api=layer) for layer in ("private", "public")}
    try:
        sha = hashlib.sha256(GUEST).hexdigest()
        calls: dict[str, Callable[[], Any]] = {}
        limits = GuestLimits(max_instances=1, host_calls_per_invoke=1000, host_calls_per_s=10**9)
        for layer, engine in engines.items():
            module = engine.compile(GUEST, sha)
            pool = TenantInstancePool(engine, module, limits, tenant_id="bench")
            calls[f"{layer} noop"] = lambda p=pool: p.invoke("noop", b"")
            calls[f"{layer} echo64"] = lambda p=pool: p.invoke("echo", PAYLOAD)
            calls[f"{layer} host calls"] = lambda p=pool: p.invoke("chatty", b"")
            assert pool.invoke("echo", PAYLOAD) == PAYLOAD
        store = wasmtime.Store(engines["public"].wasmtime_engine)
        store.set_epoch_deadline(1 << 62)
        noop = engines["public"].compile(GUEST, sha).pre.instantiate(store).exports(store)["noop"]
        calls["floor: Func.__call__ noop"] = lambda: noop(store, 0, 0)
        wall: dict[str, list[int]] = {name: [] for name in calls}
        cpu: dict[str, list[float]] = {name: [] for name in calls}
        for fn in calls.values():
            _block(fn, WARM, [], [])
        for _ in range(ROUNDS):
            for name, fn in calls.items():
                _block(fn, PER_ROUND, wall[name], cpu[name])
    finally:
        for engine in engines.values():
            engine.close()
    rows, figures = [], {}
    for name in calls:
        p50, p99, cpu_us = _pct(wall[name], 0.5), _pct(wall[name], 0.99), statistics.median(cpu[name])
        rows.append(f"| {name} | {p50:.2f} | {p99:.2f} | {cpu_us:.2f} |")
        key = name.split(":")[0].replace(" ", "_")
        figures[f"{key}_p50_us"] = round(p50, 2)
        figures[f"{key}_cpu_us"] = round(cpu_us, 2)
    for what in ("noop", "echo64", "host_calls"):
        figures[f"public_over_private_{what}"] = round(
            figures[f"public_{what}_p50_us"] / figures[f"private_{what}_p50_us"], 2
        )
    return {
        "title": "wasmtime layers: the direct C path (private) vs wasmtime-py's public API, per invoke",
        "figures": figures,
        "table": "| path | P50 us | P99 us | CPU us/call (median round) |\n|---|---|---|---|\n"
        + "\n".join(rows),
        "notes": (
            f"{ROUNDS} interleaved rounds x {PER_ROUND} calls per path after {WARM} warm-up calls, one "
            "process, one Engine per layer (Engine(wasmtime_api=...)), one warm instance each "
            "(max_instances=1), "
            "epoch ticker running. Every path is a full TenantInstancePool.invoke (deadline, tw_alloc for "
            "non-empty input, call, output copy, reset) except the floor, wasmtime-py's Func.__call__ "
            "alone. 'host calls' = one invoke making 16 tensorwasm.log host calls. The public layer is "
            "the fallback when a wasmtime-py upgrade breaks engine/lowlevel.py's private layer "
            "(TENSORWASM_RUNTIME_WASMTIME_API=public forces it). The machine is shared: load average "
            f"{load} (1/5/15 min) at the start; read the ratios, not the absolute P99s."
        ),
    }
