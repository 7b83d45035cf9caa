"""Cancelling a running guest (DELETE /v1/jobs/{id}) and what the deadline slices cost a long guest.

engine/deadlines.py gives every call a store deadline at most one slice (50 ms) ahead; wasmtime's
epoch deadline callback, on the guest's own thread, then checks the run's cancel flag and the real
deadline and lets it run one more slice. Measured in one process, on real wasm, beside the naive
approach it replaced (no callback: the call's store deadline is its whole timeout, so a guest that
never calls the host stops only at its deadline):
- cancel latency: a guest spinning in a loop with no host call, under a 600 s deadline (sliced) or
  a 1 s deadline (naive, which would otherwise wait 600 s), cancelled from another thread ~0.2 s in;
  time from `GuestRun.cancel` to the worker thread holding the `cancelled` fault.
- the slices' cost: a compute loop (~0.3-1 s, no host calls) timed by the calling thread's CPU
  clock in interleaved rounds, unsliced vs 50 ms slices vs 1-tick slices (a callback every 1 ms,
  50x the default rate), and the callbacks each made (counted), so the cost per callback is
  (CPU with 1-tick slices - CPU unsliced) / callbacks.
"""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from tensorwasm.runtime.engine import Engine, GuestLimits, TenantInstancePool, deadlines
from tensorwasm.runtime.errors import Cancelled, DeadlineExceeded
from tensorwasm.runtime.tenancy.runs import GuestRun

LOOP = 400_000_000
GUEST = f"""(module
  (memory (export "memory") 1)
  (func (export "tw_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "count") (param i32 i32) (result i64) (local $i i32)
    (loop $l
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const {LOOP}))))
    (i64.const 0))
  (func (export "spin") (param i32 i32) (result i64) (loop $f (br $f)) (i64.const 0)))""".encode()
ROUNDS, CANCELS = 9, 12


def _pool(engine: Engine, timeout_s: float) -> TenantInstancePool:
    module = engine.compile(GUEST, hashlib.sha256(GUEST).hexdigest())
    limits = GuestLimits(max_instances=1, timeout_s=timeout_s)
    return TenantInstancePool(engine, module, limits, tenant_id="bench")


def _cancel_latency(pool: TenantInstancePool) -> float:
    """Seconds from cancel() to the worker holding the fault (deadline_exceeded counts too: naive)."""
    run, done = GuestRun(), threading.Event()
    ended: list[float] = []

    def work() -> None:
        try:
            run.call((pool.invoke, "spin"), b"")
        except (Cancelled, DeadlineExceeded):
            ended.append(time.perf_counter())
        done.set()

    thread = threading.Thread(target=work)
    thread.start()
    while run.started is None:
        time.sleep(0.001)
    time.sleep(0.2)  # inside the loop, past any start-up
    cancelled = time.perf_counter()
    run.cancel("bench")
    done.wait(30)
    thread.join(30)
    return ended[0] - cancelled


def run() -> dict[str, Any]:
    load = " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    sliced, naive, one_tick = Engine(), Engine(), Engine()
    naive.watch = lambda store, instance: deadlines.UNSLICED  # type: ignore[method-assign]
    one_tick._ticker.slice_ticks = 1  # a callback every tick: 50x the default rate
    callbacks = {"one_tick": 0, "sliced": 0}
    for name, engine in (("one_tick", one_tick), ("sliced", sliced)):
        ticker, ticks_left = engine._ticker, engine._ticker.ticks_left

        def counted(runner: Any, name: str = name, ticks_left: Any = ticks_left) -> int:
            callbacks[name] += 1
            left: int = ticks_left(runner)
            return left

        ticker.ticks_left = counted  # type: ignore[method-assign]
    try:
        pools = {name: _pool(engine, 600) for name, engine in
                 (("unsliced", naive), ("sliced", sliced), ("one_tick", one_tick))}  # fmt: skip
        for pool in pools.values():
            pool.invoke("count", b"")  # warm-up
        cpu: dict[str, list[float]] = {name: [] for name in pools}
        names = list(pools)
        for i in range(ROUNDS):
            for name in names[i % 3 :] + names[: i % 3]:  # each variant first in turn
                pool = pools[name]
                c0 = time.thread_time()
                pool.invoke("count", b"")
                cpu[name].append(time.thread_time() - c0)
        counted_calls = ROUNDS + 1  # the warm-up call above counted too
        cancel_pool, naive_pool = _pool(sliced, 600), _pool(naive, 1.0)
        fast = [_cancel_latency(cancel_pool) for _ in range(CANCELS)]
        slow = [_cancel_latency(naive_pool) for _ in range(3)]
        for pool in [*pools.values(), cancel_pool, naive_pool]:
            pool.close()
    finally:
        for engine in (sliced, naive, one_tick):
            engine.close()
    # The least CPU a variant needed: the loop is deterministic, so extra time is the machine's
    # (shared cores, caches, frequency), not the variant's; the medians are in the notes.
    med = {name: min(values) for name, values in cpu.items()}
    medians = ", ".join(f"{name} {statistics.median(values):.3f} s" for name, values in cpu.items())
    per_call = {name: callbacks[name] / counted_calls for name in callbacks}
    cost_us = (med["one_tick"] - med["unsliced"]) / max(per_call["one_tick"], 1) * 1e6
    figures = {
        "cancel_p50_ms": round(statistics.median(fast) * 1000, 1),
        "cancel_max_ms": round(max(fast) * 1000, 1),
        "naive_cancel_p50_ms": round(statistics.median(slow) * 1000, 1),
        "loop_cpu_s_unsliced": round(med["unsliced"], 3),
        "loop_cpu_s_sliced_50ms": round(med["sliced"], 3),
        "loop_cpu_s_sliced_1tick": round(med["one_tick"], 3),
        "callbacks_per_loop_50ms": round(per_call["sliced"], 1),
        "callbacks_per_loop_1tick": round(per_call["one_tick"], 1),
        "cost_per_callback_us": round(cost_us, 1),
        "sliced_50ms_overhead_pct": round((med["sliced"] / med["unsliced"] - 1) * 100, 2),
    }
    table = (
        "| variant | cancel to worker free | loop CPU s (least of rounds) | callbacks per loop |\n"
        "|---|---|---|---|\n"
        f"| 50 ms slices (shipped) | p50 {figures['cancel_p50_ms']} ms, max {figures['cancel_max_ms']} ms "
        f"| {figures['loop_cpu_s_sliced_50ms']} | {figures['callbacks_per_loop_50ms']} |\n"
        f"| no callback (naive: before) | at the deadline: p50 {figures['naive_cancel_p50_ms']} ms "
        f"with a 1 s deadline cancelled 0.2 s in | {figures['loop_cpu_s_unsliced']} | 0 |\n"
        f"| 1-tick slices (50x the rate) | - | {figures['loop_cpu_s_sliced_1tick']} "
        f"| {figures['callbacks_per_loop_1tick']} |"
    )
    return {
        "title": "Cancelling a running guest: deadline slices vs waiting for the deadline",
        "figures": figures,
        "targets": {"cancel_max_ms": "<= 1000"},
        "table": table,
        "notes": (
            f"One process, three Engines (1 ms ticks): deadline callback with 50 ms slices (what ships), "
            f"none (the naive approach it replaced: a cancel waits for the deadline), and 1-tick slices. "
            f"Cancel: {CANCELS} guests spinning without host calls under a 600 s deadline, cancelled "
            f"0.2 s in from another thread; the naive row used a 1 s deadline (3 runs). Loop: a "
            f"{LOOP:,}-iteration wasm loop, no host calls, {ROUNDS} interleaved rounds, calling thread's "
            f"CPU time (thread_time; the least of the rounds in the table, medians: {medians}), "
            f"callbacks counted. Cost per callback = (CPU 1-tick - CPU unsliced) "
            f"/ callbacks. The machine is shared: load average {load} (1/5/15 min) at the start; the "
            f"CPU clock is less disturbed by the load than wall time, but read ratios, not absolutes."
        ),
    }
