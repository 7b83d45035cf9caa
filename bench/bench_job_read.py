"""Reading a big async job's output: how long the shard's event loop stalls (review F6).

One shard in this process (CPU backend, real wasm, real HTTP on loopback), one finished job whose
output is 16 MiB (the default maxOutputBytes). A ticker on the shard's event loop wakes every 5 ms
and records how late it woke; the largest lateness during one read is that read's loop stall: what
every other tenant of the shard waited. Three ways to read the same job, in interleaved rounds:
- naive: GET /v1/jobs/{id}, base64 and JSON of the whole output on the loop (the code before this
  change, run by lifting the inline threshold);
- worker: GET /v1/jobs/{id} as it is now (base64 on a worker thread, written in 1 MiB pieces);
- raw: GET /v1/jobs/{id}/output (the bytes, no encoding);
- idle: no read, 0.2 s of ticks: the floor, how late the ticker wakes on this box anyway.
Usage: .venv/bin/python bench/bench_job_read.py [MiB] [rounds]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from typing import Any

from tests.conftest import wait_for
from tests.runtime_fixtures import start_runtime_server, tenant

from tensorwasm.runtime.api import app as app_module

TICK_S = 0.005


class Ticker:
    def __init__(self) -> None:
        self.worst = 0.0
        self.stop = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stop:
            due = loop.time() + TICK_S
            await asyncio.sleep(TICK_S)
            self.worst = max(self.worst, loop.time() - due)


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    cfg = tenant(
        "alpha", max_body_bytes=mib << 20, max_output_bytes=mib << 20, linear_memory_bytes=(3 * mib + 4) << 20
    )
    gen = start_runtime_server([cfg])
    server = next(gen)
    try:
        body = os.urandom(mib << 20)
        job = server.request("POST", "/v1/functions/echo/invoke?mode=async", body, token=cfg.token).json()

        def done() -> dict[str, Any] | None:
            jobs = server.request("GET", "/v1/jobs", token=cfg.token).json()["jobs"]
            return jobs[0] if jobs and jobs[0]["state"] not in ("queued", "running") else None

        ended = wait_for(done, 120, "the job", interval=0.05)
        assert ended["state"] == "succeeded", ended  # e.g. over the guest's linearMemory
        ticker = Ticker()
        asyncio.run_coroutine_threadsafe(ticker.run(), server.loop)
        inline = app_module.INLINE_OUTPUT_BYTES
        paths = {"naive": f"/v1/jobs/{job['id']}", "worker": f"/v1/jobs/{job['id']}"}
        paths["raw"] = f"/v1/jobs/{job['id']}/output"
        paths["idle"] = ""
        stalls: dict[str, list[float]] = {k: [] for k in paths}
        took: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(rounds):
            for mode, path in paths.items():
                app_module.INLINE_OUTPUT_BYTES = 1 << 62 if mode == "naive" else inline
                time.sleep(0.05)
                ticker.worst = 0.0
                start = time.perf_counter()
                if path:
                    reply: Any = server.request("GET", path, token=cfg.token)
                    assert reply.status == 200, reply.body[:200]
                else:
                    time.sleep(0.2)
                took[mode].append(time.perf_counter() - start)
                time.sleep(2 * TICK_S)  # the tick after the read lands
                stalls[mode].append(ticker.worst)
        app_module.INLINE_OUTPUT_BYTES = inline
        ticker.stop = True
        print(f"output {mib} MiB, {rounds} interleaved rounds, load {os.getloadavg()[0]:.1f}, "
              f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")  # fmt: skip
        print(f"{'read':8} {'loop stall median':>18} {'max':>8} {'GET median':>11}")
        for mode in paths:
            print(
                f"{mode:8} {statistics.median(stalls[mode]) * 1e3:15.1f} ms {max(stalls[mode]) * 1e3:5.0f} ms"
                f" {statistics.median(took[mode]) * 1e3:8.0f} ms"
            )
    finally:
        next(gen, None)


if __name__ == "__main__":
    main()
