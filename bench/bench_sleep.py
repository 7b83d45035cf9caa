"""Idle sleep: wake latency over HTTP, density and the swap onset with tenants 10% active, a wake storm.

A real shard in this process (engine, the best accelerator here, the aiohttp API on loopback, a
snapshot store in a temp dir) serving tests/fixtures/counter.wat tenants (their total lives in a GPU
buffer, so a lost or doubled request shows in the answer).
- wake: for 1/16/128/512 MiB of GPU state (random bytes, incompressible), put the tenant to sleep and
  time the first request's HTTP round trip (wake + invoke + reply): from the hot tier (the capture
  put the blob there) and from disk (the hot-tier entry dropped and the blob's pages evicted from the
  page cache with posix_fadvise, so the file is read from the device). Beside them, in the same run:
  restore_snapshot() of the same blob into the awake tenant (hot, and file with the page cache
  dropped), the pinned-copy floor (CUDA: one pinned host-to-device copy of the state; CPU: one memcpy)
  and the round trip of an awake invoke.
- density: the all-resident case holds N0 = budget / cap tenants, all active; the sleep cases place
  3x, the planner's swap onset, 5x, 6x ... 9x and 10x - 1 as many with the same budget, each tenant
  awake 10% of the time by its own seeded on/off process (bench/sleep_activity.py: bursts of
  requests, quiet gaps, idle.after 500ms counted), independent of the others and of the planner.
  Open loop, latency from each request's scheduled time; P50/P99 against the 100 ms SLO and the
  fewest count from which it stays over (`slo_crossed_tenants`); wakes, evictions and every wake's
  time from the shard, beside the same trace replayed on the ledger alone. Then the onset scan:
  tenant counts from N0 + 1 up, each fed to the runtime's real `Residency` on a virtual clock, and
  `onset_measured_tenants`, the fewest count from which more than 1% of wakes found the room full,
  beside the planner's `swap_onset` and the error.
- storm: 100 sleeping tenants (1 MiB of state each) called at once, with room for all and with room
  for 20: time until all are answered, the most GPU bytes reserved at once vs the budget, requests
  answered and the counters (none lost, none doubled).
Env: TENSORWASM_BENCH_SLEEP_SIZES (MiB list), TENSORWASM_BENCH_ACCELERATOR, TENSORWASM_BENCH_SLEEP_SECONDS,
TENSORWASM_BENCH_SLEEP_RATE (density's requests a second within a burst, 10), TENSORWASM_BENCH_SLEEP_CASES
(which of wake,density,storm,prewarm to run; all by default), TENSORWASM_BENCH_SLEEP_ONSET_SECONDS (virtual
seconds per trace of the onset scan, 1800), TENSORWASM_BENCH_SLEEP_ONSET_SEEDS (traces per count, 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import math
import os
import random
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sleep_activity  # bench/ is a folder of scripts, not a package

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]
COUNTER = (REPO / "tests" / "fixtures" / "counter.wat").read_bytes()
SLO_MS = 100.0
SWAP_SHARE = 0.01  # "swapping": more than 1% of wakes find the room full (planner.model.SWAP_TOLERANCE)
CASE_TITLES = {"wake": "wake on the first request", "density": "density", "storm": "wake storm",
               "prewarm": "prewarm"}  # fmt: skip
IDLE_AFTER, IDLE_AFTER_S = "500ms", 0.5


def row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] if s else float("nan")


class Server:
    """A real shard with idle sleep on loopback, run on its own event loop thread."""

    def __init__(self, acc: Any, work: Path, budget: int | None, **shard_options: Any) -> None:
        from tensorwasm.runtime.api.app import build_app
        from tensorwasm.runtime.api.server import serve
        from tensorwasm.runtime.engine import Engine
        from tensorwasm.runtime.modules import ModuleLoader
        from tensorwasm.runtime.shard import Shard
        from tensorwasm.runtime.snapshots.store import SnapshotStore

        self.acc = acc
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.engine = Engine(cache_dir=work / "cache")
        self.store = SnapshotStore(work / "store")

        async def start() -> tuple[Any, Any, int]:
            loader = ModuleLoader(self.engine, 64 << 20, 10.0)
            shard = Shard(self.engine, acc, loader, sleep_store=self.store, resident_gpu_bytes=budget,
                          **shard_options)  # fmt: skip
            runner, port = await serve(build_app(shard), "127.0.0.1", 0)
            return shard, runner, port

        self.shard, self.runner, self.port = self.run(start())
        self._local = threading.local()

    def run(self, coro: Any, timeout: float = 600) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sync(self, configs: list[Any]) -> None:
        self.run(self.shard.sync(configs))

    def sleep(self, name: str) -> bool:
        return bool(self.run(self.shard.sleep(name)))

    def call(self, cfg: Any, delta: int = 0) -> tuple[int, int]:
        """(HTTP status, the counter's total) of one add over a per-thread keep-alive connection; a
        connection the server closed while idle (a long capture between two calls) is reopened once,
        as HTTP clients do: the request never reached the server."""
        for attempt in (0, 1):
            conn = getattr(self._local, "conn", None)
            fresh = conn is None
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
            try:
                conn.request("POST", "/v1/functions/add/invoke", struct.pack("<q", delta),
                             {"Authorization": f"Bearer {cfg.token}"})  # fmt: skip
                resp = conn.getresponse()
                body = resp.read()
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                conn.close()
                self._local.conn = None
                if fresh or attempt:
                    raise
                continue
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                self._local.conn = None
            return resp.status, struct.unpack("<q", body)[0] if resp.status == 200 else -1
        raise AssertionError("unreachable")

    def close(self) -> None:
        async def stop() -> None:
            await self.runner.cleanup()
            await self.shard.close()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.engine.close()


def tenant(name: str, cap: int) -> Any:
    from tensorwasm.api.tenant import Limits
    from tensorwasm.runtime.tenancy.config import ModuleSource, TenantConfig

    module = ModuleSource(sha256=hashlib.sha256(COUNTER).hexdigest(), data=COUNTER, origin="counter.wat")
    limits = Limits(gpu_memory_bytes=cap, max_concurrency=2, queue_length=64, timeout_ms=30_000)
    cfg = TenantConfig(
        name=name, token=f"token-{name}-0123456789", module=module, functions=("add",), limits=limits
    )
    return replace(cfg, uid=f"uid-{name}", idle_after="never")


def round_cap(nbytes: int) -> int:
    return -(-nbytes // (2 * MiB)) * 2 * MiB


def add_state(server: Server, name: str, nbytes: int, seed: int = 0) -> None:
    """`nbytes` of random bytes in one more GPU buffer of the tenant (part of what a sleep captures)."""
    if nbytes <= 0:
        return
    device = server.shard.served[name].device
    handle = device.alloc(nbytes)
    rng = np.random.default_rng(seed)
    piece = 64 * MiB
    for at in range(0, nbytes, piece):
        n = min(piece, nbytes - at)
        device.write(handle, at, memoryview(rng.bytes(n)))
    device.sync()


def evict_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def floor_ms(acc: Any, nbytes: int, reps: int) -> float:
    """The pinned-copy floor: CUDA one pinned H2D copy of nbytes; CPU one memcpy of nbytes."""
    samples = []
    if acc.name == "cuda":
        dev = acc.open_tenant("bench-floor", nbytes + 4 * MiB)
        try:
            handle = dev.alloc(nbytes)
            stage = acc.pinned_buffer(nbytes)
            for _ in range(reps + 1):
                t = time.perf_counter()
                dev.write_async(handle, 0, stage[:nbytes])
                dev.sync()
                samples.append(time.perf_counter() - t)
        finally:
            acc.close_tenant("bench-floor")
    else:
        src, dst = np.ones(nbytes, np.uint8), np.ones(nbytes, np.uint8)
        for _ in range(reps + 1):
            t = time.perf_counter()
            np.copyto(dst, src)
            samples.append(time.perf_counter() - t)
    return statistics.median(samples[1:]) * 1000


def wake_case(acc: Any, work: Path, size_mib: int, reps: int) -> dict[str, float]:
    from tensorwasm.runtime.snapshots.hot_tier import HOT_TIERS
    from tensorwasm.runtime.snapshots.restore import restore_snapshot

    nbytes = size_mib * MiB
    server = Server(acc, work / f"wake-{size_mib}", None)
    name = f"w{size_mib}"
    cfg = tenant(name, round_cap(nbytes) + 4 * MiB)
    try:
        server.sync([cfg])
        add_state(server, name, nbytes - 8, seed=size_mib)
        total = server.call(cfg, 1)[1]
        rtt = []
        for _ in range(reps):
            t = time.perf_counter()
            server.call(cfg)
            rtt.append(time.perf_counter() - t)
        out: dict[str, list[float]] = {"hot": [], "disk": [], "restore_hot": [], "restore_file": []}
        parts: dict[str, list[float]] = {
            "hot_open": [],
            "hot_restore": [],
            "disk_open": [],
            "disk_restore": [],
        }
        tier = HOT_TIERS.for_accelerator(acc)
        sources: set[str] = set()
        for mode in ("hot", "disk"):
            for _ in range(reps):
                assert server.sleep(name), "the tenant did not sleep"
                sleeper = server.shard.served[name].sleeper
                path = server.store.path_of(sleeper.key, sleeper.digest)
                if mode == "disk":
                    if tier is not None:
                        tier.drop(sleeper.digest)
                    evict_page_cache(path)
                t = time.perf_counter()
                status, got = server.call(cfg)
                out[mode].append(time.perf_counter() - t)
                assert status == 200 and got == total, (status, got, total)
                for part in ("open", "restore"):
                    parts[f"{mode}_{part}"].append(sleeper.last_wake[part])
                # The same blob restored into the awake tenant, no HTTP, no open: the restore figure.
                pool, device = server.shard.served[name].pool, server.shard.served[name].device
                if mode == "disk":
                    if tier is not None:
                        tier.drop(sleeper.digest)
                    evict_page_cache(path)
                t = time.perf_counter()
                result = restore_snapshot(
                    path,
                    tenant_uid=sleeper.key,
                    module_sha256=cfg.module.sha256,
                    pool=pool,
                    device=device,
                    accelerator=acc,
                )
                out["restore_" + ("hot" if mode == "hot" else "file")].append(time.perf_counter() - t)
                sources.add(f"{mode}:{result.source}")
        figures = {
            f"wake_{m}_{q}_ms": pct(out[m], p) * 1000
            for m in ("hot", "disk")
            for q, p in (("p50", 50), ("p99", 99))
        }
        figures.update(
            {f"{k}_p50_ms": statistics.median(v) * 1000 for k, v in out.items() if k.startswith("restore")}
        )
        figures["awake_rtt_p50_ms"] = statistics.median(rtt) * 1000
        figures.update({f"wake_{k}_p50_ms": statistics.median(v) * 1000 for k, v in parts.items()})
        figures["floor_ms"] = floor_ms(acc, nbytes, min(reps, 10))
        figures["samples"] = reps
        assert "hot:hot" in sources or tier is None, sources
        return figures
    finally:
        server.close()


def _poisson(rate: float, seconds: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < seconds:
        arrivals.append(t)
        t += rng.expovariate(rate)
    return arrivals


def open_loop(server: Server, schedule: list[tuple[float, Any]]) -> dict[str, Any]:
    """Each (seconds from the start, tenant config) of `schedule` sent at its time, open loop: latency
    counts from the scheduled time, so a stalled server is not hidden by a stalled client."""
    lat: list[float] = []
    errors: dict[int, int] = {}
    lock = threading.Lock()
    start = time.perf_counter() + 0.2

    def one(item: tuple[float, Any]) -> None:
        at, cfg = item
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        status, _ = server.call(cfg, 1)
        took = time.perf_counter() - (start + at)
        with lock:
            if status == 200:
                lat.append(took)
            else:
                errors[status] = errors.get(status, 0) + 1

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(one, schedule))
    return {
        "n": len(schedule),
        "p50_ms": pct(lat, 50) * 1000,
        "p99_ms": pct(lat, 99) * 1000,
        "errors": errors,
    }


def prewarm_case(acc: Any, work: Path, size_mib: int, reps: int) -> dict[str, float]:
    """At a predicted slot (spec.idle.prewarm: history; the shard's wall clock in the bench's hand):
    the first request to the tenant prewarmed (a hit) against the same request to it asleep (a wake
    from the hot tier), and what a miss costs: the prewarm's wake (off any request's path) and its
    sleep back into the same blob, unused."""
    nbytes = size_mib * MiB
    day, nine = 86_400.0, 20 * 86_400.0 + 9 * 3600
    clock = [nine]
    server = Server(acc, work / f"prewarm-{size_mib}", None, wall_clock=lambda: clock[0])
    name = f"p{size_mib}"
    cfg = replace(tenant(name, round_cap(nbytes) + 4 * MiB), idle_after="1h", idle_prewarm="history")
    samples: dict[str, list[float]] = {"hit": [], "asleep": [], "prewarm_wake": [], "miss_sleep": []}
    try:
        server.sync([cfg])
        add_state(server, name, nbytes - 8, seed=size_mib)
        for d in (0, 1):  # called at 09:00 on two days: the third day's 09:00 slot is predicted
            clock[0] = nine + d * day + 1
            assert server.call(cfg)[0] == 200
        clock[0] = nine + 2 * day - 30
        sleeper = server.shard.served[name].sleeper

        def prewarm() -> float:
            sleeper.prewarm_slot = None  # each prewarm stands for another day's slot
            t = time.perf_counter()
            assert server.run(server.shard.prewarm()) == [name]
            return time.perf_counter() - t

        for _ in range(reps):
            assert server.sleep(name), "the tenant did not sleep"
            samples["prewarm_wake"].append(prewarm())  # a guess: off any request's path
            t = time.perf_counter()
            assert server.sleep(name)  # a miss: back to sleep unused
            samples["miss_sleep"].append(time.perf_counter() - t)
            prewarm()
            t = time.perf_counter()
            assert server.call(cfg)[0] == 200  # a hit
            samples["hit"].append(time.perf_counter() - t)
            assert server.sleep(name)
            t = time.perf_counter()
            assert server.call(cfg)[0] == 200  # the same request, not prewarmed: it wakes the tenant
            samples["asleep"].append(time.perf_counter() - t)
    finally:
        server.close()
    return {f"{k}_p50_ms": pct(v, 50) * 1000 for k, v in samples.items()} | {"samples": float(reps)}


def density_case(acc: Any, work: Path, seconds: float, rate: float) -> tuple[dict[str, float], list[str]]:
    """All resident (n0 tenants, all active) against n tenants awake 10% of the time each, drawn
    independently (sleep_activity.py), on a real shard over HTTP; then the swap onset measured on
    the runtime's own ledger with the same process (virtual time, many counts) beside the planner's."""
    try:
        from tensorwasm.planner.model import swap_onset
    except ImportError:  # the GPU machine's image has no PyYAML (the planner's SKU catalog)
        swap_onset = None  # type: ignore[assignment]

    cap, n0, fraction = 16 * MiB, 8, 0.10
    budget = n0 * cap
    activity = sleep_activity.Activity(fraction, IDLE_AFTER_S, rate_per_s=rate)
    figures: dict[str, float] = {"active_fraction": fraction, "burst_rate_per_s": rate,
                                 "burst_requests": activity.burst_requests,
                                 "quiet_gap_mean_s": round(activity.gap_mean_s(), 3),
                                 "load_1min_before": os.getloadavg()[0]}  # fmt: skip
    rows = []
    # All resident: n0 tenants, every one active, the same total rate as 10x n0 sleepers would send.
    server = Server(acc, work / "density-0", budget)
    try:
        configs = [tenant(f"r{i:03d}", cap) for i in range(n0)]
        server.sync(configs)
        arrivals = _poisson(10 * n0 * activity.requests_per_s(), seconds, 1)
        base = open_loop(server, [(at, configs[k % n0]) for k, at in enumerate(arrivals)])
    finally:
        server.close()
    figures.update(
        {"resident_tenants": n0, "resident_p50_ms": base["p50_ms"], "resident_p99_ms": base["p99_ms"]}
    )
    rows.append(row("all resident", n0, base["n"], f"{base['p50_ms']:.2f}", f"{base['p99_ms']:.2f}",
                    0, 0, "", "", "", base["errors"] or 0))  # fmt: skip
    predicted = swap_onset(n0, fraction) if swap_onset else None
    mean_onset = math.floor(round(n0 / fraction, 9)) + 1  # the mean model's: ceil(n * f) > n0
    # Around and past the planner's onset up to the mean model's fit (10x - 1): where the shard's P99
    # crosses the SLO is read off these (`slo_crossed_tenants`).
    counts = sorted({n0 * 3, predicted or n0 * 4, *range(n0 * 5, mean_onset, n0), mean_onset - 1})
    p99_over: dict[int, dict[str, float]] = {}
    for n in counts:
        label = f"n{n}"
        server = Server(acc, work / f"density-{label}", budget)
        try:
            configs = [replace(tenant(f"s{i:03d}", cap), idle_after=IDLE_AFTER) for i in range(n)]
            server.sync(configs)  # loading past the budget already puts the least recently used to sleep
            for cfg in configs:
                server.sleep(cfg.name)
            requests = sleep_activity.trace(n, activity, seconds, seed=n)
            wakes0, evicted0 = _wakes(), _evictions()
            with _wake_times() as wake_s:
                res = open_loop(server, [(r.at, configs[r.tenant]) for r in requests])
            wakes, evicted = _wakes() - wakes0, _evictions() - evicted0
            peak = server.shard.residency.peak
        finally:
            server.close()
        # The same trace on the ledger alone in virtual time: what the onset scan below counts.
        virtual = sleep_activity.replay(requests, n, activity, seconds, cap, budget)
        share = evicted / wakes if wakes else 0.0
        figures.update(
            {
                f"{label}_tenants": n,
                f"{label}_p50_ms": res["p50_ms"],
                f"{label}_p99_ms": res["p99_ms"],
                f"{label}_requests": res["n"],
                f"{label}_wakes": wakes,
                f"{label}_evictions": evicted,
                f"{label}_evicting_wake_share": round(share, 4),
                f"{label}_wake_share": round(wakes / res["n"], 4) if res["n"] else 0.0,
                f"{label}_wake_p50_ms": pct(wake_s, 50) * 1000,
                f"{label}_wake_p99_ms": pct(wake_s, 99) * 1000,
                f"{label}_virtual_evicting_wake_share": round(virtual.evicting_wake_share, 4),
                f"{label}_meets_slo": float(res["p99_ms"] <= SLO_MS and not res["errors"]),
                f"{label}_peak_reserved_mib": peak / MiB,
            }
        )
        rows.append(row(f"{n} tenants, 10% awake each", n, res["n"], f"{res['p50_ms']:.2f}",
                        f"{res['p99_ms']:.2f}", f"{wakes:.0f}", f"{evicted:.0f}", f"{share:.0%}",
                        f"{virtual.evicting_wake_share:.0%}",
                        f"{pct(wake_s, 50) * 1000:.1f} / {pct(wake_s, 99) * 1000:.1f}",
                        res["errors"] or 0))  # fmt: skip
        p99_over[n] = {"p99_over_slo": float(res["p99_ms"] > SLO_MS or bool(res["errors"]))}
    crossed = sleep_activity.onset(p99_over, "p99_over_slo", 0.5)
    if crossed is not None:  # the fewest count from which every larger one ran over the SLO
        figures["slo_crossed_tenants"] = crossed
    figures.update(onset_scan(activity, n0, cap, predicted, mean_onset))
    figures["load_1min_after"] = os.getloadavg()[0]
    return figures, rows


def onset_scan(activity: Any, n0: int, cap: int, predicted: int | None, mean_onset: int) -> dict[str, float]:
    """Tenant counts from n0 to 1.5x the mean model's onset, each an independent seeded trace fed to
    the runtime's Residency on a virtual clock (sleep_activity.replay): the fewest count from which
    more than 1% of wakes found the room full (`onset_measured_tenants`), with the planner's
    prediction and its error; also where the time over budget and the rewakes pass 1%."""
    virtual_s = float(os.environ.get("TENSORWASM_BENCH_SLEEP_ONSET_SECONDS", "1800"))
    seeds = tuple(range(1, int(os.environ.get("TENSORWASM_BENCH_SLEEP_ONSET_SEEDS", "2")) + 1))
    top = round(1.5 * mean_onset)
    counts = sorted({*range(n0 + 1, min(top, 8 * n0) + 1), *range(8 * n0 + 5, top + 1, 5), mean_onset})
    found = sleep_activity.scan(counts, activity, virtual_s, seeds, cap, n0)
    out: dict[str, float] = {"onset_virtual_seconds": virtual_s, "onset_seeds": float(len(seeds)),
                             "onset_counts_scanned": float(len(counts))}  # fmt: skip
    onsets = {key: sleep_activity.onset(found, key, SWAP_SHARE) for key in found[counts[0]]}
    for n in counts:
        if n % 8 == 0 or n in (predicted, mean_onset, onsets["evicting_wake_share"]):
            out[f"scan_{n}_evicting_wake_share"] = round(found[n]["evicting_wake_share"], 4)
    out["scan_awake_share"] = round(statistics.mean(v["awake_share"] for v in found.values()), 4)
    for key, name in (("evicting_wake_share", "onset_measured_tenants"),
                      ("over_budget_share", "onset_over_budget_tenants"),
                      ("rewake_share", "onset_rewake_tenants")):  # fmt: skip
        at = onsets[key]
        if at is not None:
            out[name] = at
    out["mean_model_onset_tenants"] = mean_onset
    if predicted is not None:
        out["planner_predicted_onset_tenants"] = predicted
        measured = out.get("onset_measured_tenants")
        if measured:
            out["planner_onset_off"] = round(abs(predicted - measured) / measured, 4)
            out["mean_model_onset_off"] = round(abs(mean_onset - measured) / measured, 4)
    return out


@contextlib.contextmanager
def _wake_times() -> Iterator[list[float]]:
    """Every wake's seconds on the shard (room, which may mean capturing a victim, open, restore), as
    the shard observes them into tensorwasm_tenant_wake_seconds, meanwhile."""
    from tensorwasm.runtime import metrics

    histogram, samples = metrics.TENANT_WAKE_SECONDS, []
    observe = histogram.observe

    def collect(value: float, *args: Any, **kwargs: Any) -> None:
        samples.append(value)
        observe(value, *args, **kwargs)

    histogram.observe = collect  # type: ignore[method-assign]
    try:
        yield samples
    finally:
        del histogram.observe  # the class's method again


def _evictions() -> float:
    from tensorwasm.runtime import metrics

    return sum(
        s.value
        for m in metrics.TENANT_SLEEPS.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels.get("reason") == "evicted"
    )


def _wakes() -> float:
    from tensorwasm.runtime import metrics

    return sum(
        s.value for m in metrics.TENANT_WAKES.collect() for s in m.samples if s.name.endswith("_total")
    )


def storm_case(acc: Any, work: Path, room: int, count: int = 100) -> dict[str, float]:
    cap = 4 * MiB
    server = Server(acc, work / f"storm-{room}", room * cap)
    try:
        configs = [replace(tenant(f"s{i:03d}", cap), idle_after="1h") for i in range(count)]  # evictable
        for i in range(0, count, 10):
            server.sync(configs[: i + 10])
            for cfg in configs[i : i + 10]:
                add_state(server, cfg.name, 1 * MiB, seed=i) if not server.shard.served[
                    cfg.name
                ].asleep else None
        for cfg in configs:
            server.sleep(cfg.name)
        assert all(server.shard.served[c.name].asleep for c in configs)
        worst = {"open_caps": 0, "in_use": 0, "over_cap": 0}
        stop = threading.Event()

        def watch() -> None:  # the caps of open devices, the bytes in them, any tenant past its cap
            while not stop.is_set():
                usage = acc.usage()
                worst["open_caps"] = max(worst["open_caps"], sum(u.cap_bytes or 0 for u in usage))
                worst["in_use"] = max(worst["in_use"], sum(u.bytes_in_use for u in usage))
                worst["over_cap"] += sum(1 for u in usage if u.cap_bytes and u.bytes_in_use > u.cap_bytes)
                time.sleep(0.001)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        barrier = threading.Barrier(count)
        lat: list[float] = []
        statuses: list[int] = []
        lock = threading.Lock()
        t0 = [0.0]

        def one(cfg: Any) -> None:
            barrier.wait()
            if not t0[0]:
                t0[0] = time.perf_counter()
            start = time.perf_counter()
            while True:
                status, _ = server.call(cfg, 1)
                if status != 429:
                    break
                time.sleep(0.01)
            with lock:
                lat.append(time.perf_counter() - start)
                statuses.append(status)

        started = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(one, configs))
        all_served = time.perf_counter() - started
        stop.set()
        watcher.join(10)
        totals = [server.call(c, 0)[1] for c in configs]
        return {
            "all_served_ms": all_served * 1000,
            "p50_ms": pct(lat, 50) * 1000,
            "max_ms": max(lat) * 1000,
            "answered": float(statuses.count(200)),
            "lost_or_doubled": float(sum(1 for t in totals if t != 1)),
            "peak_reserved_mib": server.shard.residency.peak / MiB,
            "budget_mib": room * cap / MiB,
            "max_open_caps_mib": worst["open_caps"] / MiB,
            "max_gpu_in_use_mib": worst["in_use"] / MiB,
            "samples_over_cap": float(worst["over_cap"]),
        }
    finally:
        server.close()


def run() -> dict[str, Any]:
    from tensorwasm.runtime.accel import select_accelerator
    from tensorwasm.runtime.snapshots.hot_tier import HOT_TIERS

    sizes = [int(s) for s in os.environ.get("TENSORWASM_BENCH_SLEEP_SIZES", "1,16,128,512").split(",")]
    seconds = float(os.environ.get("TENSORWASM_BENCH_SLEEP_SECONDS", "15"))
    rate = float(os.environ.get("TENSORWASM_BENCH_SLEEP_RATE", str(sleep_activity.RATE_PER_S)))
    scale = float(os.environ.get("TENSORWASM_BENCH_SLEEP_REPS_SCALE", "1"))  # fewer samples: a short lease
    cases = os.environ.get("TENSORWASM_BENCH_SLEEP_CASES", "wake,density,storm,prewarm").split(",")
    acc = select_accelerator(os.environ.get("TENSORWASM_BENCH_ACCELERATOR", "auto"))
    HOT_TIERS.configure((max(sizes) * 2 + 64) * MiB)
    work = Path(tempfile.mkdtemp(prefix="tw-bench-sleep-"))
    figures: dict[str, float] = {}
    targets: dict[str, str] = {}
    table = [
        row(
            "state",
            "wake hot P50 / P99",
            "wake disk P50 / P99",
            "in a hot wake: open + restore",
            "restore hot",
            "restore file (cold)",
            "floor",
            "awake RTT",
            "n",
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if "wake" not in cases:
        table = []
    try:
        for size in sizes if "wake" in cases else []:
            reps = max(3, round({1: 30, 16: 30, 128: 12}.get(size, 6) * scale))
            f = wake_case(acc, work, size, reps)
            for k, v in f.items():
                figures[f"{size}mib_{k}"] = round(v, 3)
            table.append(
                row(
                    f"{size} MiB",
                    *(
                        f"{f[a]:.2f} / {f[b]:.2f} ms"
                        for a, b in (
                            ("wake_hot_p50_ms", "wake_hot_p99_ms"),
                            ("wake_disk_p50_ms", "wake_disk_p99_ms"),
                        )
                    ),
                    f"{f['wake_hot_open_p50_ms']:.2f} + {f['wake_hot_restore_p50_ms']:.2f} ms",
                    *(
                        f"{f[k]:.2f} ms"
                        for k in ("restore_hot_p50_ms", "restore_file_p50_ms", "floor_ms", "awake_rtt_p50_ms")
                    ),
                    reps,
                )
            )
        if 512 in sizes and "wake" in cases:
            targets["512mib_wake_hot_p99_ms"] = "<= 100"
        if "density" in cases:
            dens, rows = density_case(acc, work, seconds, rate)
            figures.update({f"density_{k}": round(v, 4) for k, v in dens.items()})
            targets["density_planner_onset_off"] = "<= 0.15"
            table += [
                "",
                row(
                    "density case",
                    "tenants",
                    "requests",
                    "P50 ms",
                    "P99 ms",
                    "wakes",
                    "evictions",
                    "wakes that evicted",
                    "same trace, ledger replay",
                    "wake on the shard P50 / P99 ms",
                    "errors",
                ),
                "|---|---|---|---|---|---|---|---|---|---|---|",
                *rows,
            ]
        if "storm" in cases:
            table += [
                "",
                row(
                    "wake storm: 100 sleepers at once",
                    "all served",
                    "P50",
                    "max",
                    "answered",
                    "lost/doubled",
                    "peak reserved / budget",
                    "open caps / in use (max)",
                ),
                "|---|---|---|---|---|---|---|---|",
            ]
            for room in (100, 20):
                s = storm_case(acc, work, room)
                figures.update({f"storm_room{room}_{k}": round(v, 3) for k, v in s.items()})
                table.append(
                    row(
                        f"room for {room}",
                        f"{s['all_served_ms']:.0f} ms",
                        f"{s['p50_ms']:.1f} ms",
                        f"{s['max_ms']:.0f} ms",
                        f"{s['answered']:.0f}",
                        f"{s['lost_or_doubled']:.0f}",
                        f"{s['peak_reserved_mib']:.0f} / {s['budget_mib']:.0f} MiB",
                        f"{s['max_open_caps_mib']:.0f} / {s['max_gpu_in_use_mib']:.0f} MiB",
                    )
                )
                targets[f"storm_room{room}_lost_or_doubled"] = "<= 0"
                targets[f"storm_room{room}_samples_over_cap"] = "<= 0"
        if "prewarm" in cases:
            table += [
                "",
                row(
                    "prewarm: first request at a predicted slot",
                    "prewarmed (hit)",
                    "asleep (hot-tier wake)",
                    "a miss costs: prewarm wake",
                    "+ back to sleep unused",
                    "n",
                ),
                "|---|---|---|---|---|---|",
            ]
            for size in sizes:
                reps = max(3, round({1: 20, 16: 20, 128: 8}.get(size, 4) * scale))
                pw = prewarm_case(acc, work, size, reps)
                figures.update({f"prewarm_{size}mib_{k}": round(v, 3) for k, v in pw.items()})
                table.append(
                    row(
                        f"{size} MiB",
                        *(
                            f"{pw[k]:.2f} ms"
                            for k in (
                                "hit_p50_ms",
                                "asleep_p50_ms",
                                "prewarm_wake_p50_ms",
                                "miss_sleep_p50_ms",
                            )
                        ),
                        reps,
                    )
                )
    finally:
        acc.close()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "title": "Idle sleep: "
        + ", ".join(CASE_TITLES[c] for c in ("wake", "density", "storm", "prewarm") if c in cases)
        + f" ({acc.name})",
        "figures": figures,
        "targets": targets,
        "table": "\n".join(table),
        "notes": (
            "Wake = HTTP round trip of the first request to a sleeping tenant (room, open, restore, "
            "invoke, reply); restore = restore_snapshot() of the same blob into the awake tenant; floor ="
            " one pinned host-to-device copy (CUDA) or memcpy (CPU) of the state. Disk = page cache "
            "dropped. Density: budget of 8 x 16 MiB caps, idle.after 500ms; each tenant sends bursts "
            "(geometric, mean density_burst_requests, at density_burst_rate_per_s) separated by "
            "exponential quiet gaps (mean density_quiet_gap_mean_s) so that it is awake 10% of the time "
            "counting its idle tail, every tenant independent and seeded (bench/sleep_activity.py; no "
            "planner formula draws them); open loop, latency from the scheduled time; all resident = 8 "
            "tenants at the rate 80 such tenants send. Wakes that evicted = evictions / wakes on the real "
            "shard, beside the same trace replayed on the runtime's Residency alone in virtual time; "
            "slo_crossed_tenants = the fewest count from which every larger one ran its P99 over the SLO; "
            "wake on the shard = tensorwasm_tenant_wake_seconds' samples (room, a victim's capture "
            "included, open, restore), wake_share = wakes / requests. "
            "Onset scan: every count from 9 to 64, then every 5th to 1.5x the mean model's onset, "
            "density_onset_seeds traces of density_onset_virtual_seconds each on the real Residency; "
            "onset_measured_tenants = the fewest count from which more than 1% of wakes found the room "
            "full (over_budget: more than 1% of the time over 8 awake; rewake: more than 1% of requests "
            "woke a tenant evicted earlier in its burst); planner_onset_off = |predicted - measured| / "
            "measured. Storm: 100 tenants with 1 MiB of GPU state each."
        ),
    }
