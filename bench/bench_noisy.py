"""Noisy neighbour: one tenant attacks the shard while another serves at a fixed open-loop rate.

One shard process (standalone, CPU backend, default limits except where an attack needs room) serves
a neighbour (`echo`, 1 KiB in and out) and an attacker. The neighbour is called at a fixed rate from
this process (open loop: latency counts from the moment each request was due, so a stalled shard
cannot hide behind a slowed client). Each phase runs the neighbour for `PHASE_S` seconds: first
idle (the baseline), then under each attack, with the baseline repeated at the end to show drift.
Per phase: the neighbour's P50/P99 (and ratio to the idle P99 of the same run), errors, and the
shard's RSS after the phase. Attacks, each driven by `ATTACKERS` concurrent loops:

  runaway      guest spins until its 500 ms deadline
  memory       guest grows linear memory to its 64 MiB limit
  table        guest grows a table by 100 M entries (capped at 100,000 elements; instance replaced)
  hostcalls    guest calls a host function in a loop (100,000 per invoke, then trapped)
  logspam      guest logs 1 KiB lines in a loop (16 KiB per invoke, 64 KiB/s; the rest dropped, counted)
  output       guest returns 250 MiB (refused before the copy: the 16 MiB output limit)
  slowclients  2,000 connections sending headers one byte a second (cut at the 10 s header timeout)
  authflood    requests with wrong tokens as fast as they go (429 once past 20/s per address)

Not a test: figures depend on the machine. Run: `python bench/run.py --only noisy`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
PHASE_S = float(os.environ.get("NOISY_PHASE_S", "8"))
RATE = float(os.environ.get("NOISY_RATE", "200"))  # neighbour requests per second
ATTACKERS = 4
# Optional: only these attacks (comma-separated names of ATTACKS), and extra shard flags (an A/B
# of a runtime setting in one session, e.g. NOISY_SHARD_ARGS="--gil-switch-ms 5").
PHASES = [p for p in os.environ.get("NOISY_PHASES", "").split(",") if p]
SHARD_ARGS = os.environ.get("NOISY_SHARD_ARGS", "").split()
ATTACKER_ADDR = "127.0.0.2"
PAYLOAD = b"n" * 1024

_LOG = '(import "tensorwasm" "log" (func $log (param i32 i32 i32)))'
_ERR = '(import "tensorwasm" "last_error" (func $err (param i32 i32) (result i32)))'
_PRELUDE = '(memory (export "memory") 1) (func (export "tw_alloc") (param i32) (result i32) (i32.const 1024))'
ATTACK_WAT = f"""(module {_LOG} {_ERR} {_PRELUDE}
  (table $t 1 funcref)
  (func (export "table") (param i32 i32) (result i64)
    (drop (table.grow $t (ref.null func) (i32.const 100000000))) (i64.const 0))
  (func (export "hostcalls") (param i32 i32) (result i64) (local $i i32)
    (loop $l (drop (call $err (i32.const 0) (i32.const 0)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 10000000))))
    (i64.const 0))
  (func (export "logspam") (param i32 i32) (result i64) (local $i i32)
    (loop $l (call $log (i32.const 1) (i32.const 4096) (i32.const 1024))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 100000))))
    (i64.const 0))
  (func (export "output") (param i32 i32) (result i64)
    (drop (memory.grow (i32.const 4000)))
    (i64.const 262144000))
)"""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tenants_file(tmp: Path) -> Path:
    attack = tmp / "attack.wat"
    attack.write_text(ATTACK_WAT)
    runaway, bomb, echo = (FIXTURES / f for f in ("runaway.wat", "memory_bomb.wat", "echo.wat"))
    lines = ["tenants:"]
    for name, path, limits in (
        ("neighbour", echo, "{maxConcurrency: 4, queueLength: 256}"),
        ("runaway", runaway, "{timeoutMs: 500, maxConcurrency: 4}"),
        ("memory", bomb, "{linearMemory: 64Mi, maxConcurrency: 4}"),
        ("attack", attack, "{linearMemory: 512Mi, timeoutMs: 2000, maxConcurrency: 4}"),
    ):
        lines.append(
            f"  - {{name: {name}, token: token-{name}-0123456789, module: {{path: {path}, "
            f"sha256: {_sha(path.read_bytes())}}}, limits: {limits}}}"
        )
    out = tmp / "tenants.yaml"
    out.write_text("\n".join(lines) + "\n")
    return out


class Shard:
    def __init__(self, tenants: Path) -> None:
        cmd = [sys.executable, "-m", "tensorwasm.runtime", "--tenants-file", str(tenants),
               "--listen", "127.0.0.1:0", "--accelerator", "cpu", "--log-level", "info",
               "--module-dirs", f"{tenants.parent}:{FIXTURES}", *SHARD_ARGS]  # fmt: skip
        # stdout is the audit log (one line per invoke, on by default): not this benchmark's subject.
        self.proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT
        )
        assert self.proc.stderr is not None
        self.port = self.admin = 0
        deadline = time.monotonic() + 120
        while not self.port and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            m = re.search(r"listening addr=127\.0\.0\.1:(\d+) admin=127\.0\.0\.1:(\d+)", line)
            if m:
                self.port, self.admin = int(m.group(1)), int(m.group(2))
        assert self.port, "shard did not start"
        self.log_bytes = 0  # stderr bytes (guest log lines included), counted by _drain_stderr

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _drain_stderr(shard: Shard) -> None:
    assert shard.proc.stderr is not None
    stream = shard.proc.stderr
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, stream.readline)
        if not line:
            return
        shard.log_bytes += len(line)


async def _dropped_lines(session: aiohttp.ClientSession, shard: Shard) -> int:
    async with session.get(f"http://127.0.0.1:{shard.admin}/metrics") as r:
        text = await r.text()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("tensorwasm_guest_log_lines_dropped_total{")
        )
    )


async def _wait_ready(session: aiohttp.ClientSession, shard: Shard) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            async with session.get(f"http://127.0.0.1:{shard.admin}/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("shard not ready")


async def _neighbour(session: aiohttp.ClientSession, url: str, seconds: float) -> tuple[list[float], int]:
    """Open loop at RATE: request i is due at start + i/RATE, latency counts from then."""
    headers = {"Authorization": "Bearer token-neighbour-0123456789"}
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    n = int(seconds * RATE)

    async def one(due: float) -> None:
        nonlocal errors
        try:
            async with session.post(url, data=PAYLOAD, headers=headers) as r:
                body = await r.read()
                if r.status != 200 or len(body) != len(PAYLOAD):
                    errors += 1
        except (aiohttp.ClientError, TimeoutError):
            errors += 1
        latencies.append(time.perf_counter() - due)

    tasks = []
    for i in range(n):
        due = start + i / RATE
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    return latencies, errors


def _invoker(tenant: str, function: str) -> Callable[[aiohttp.ClientSession, int], Awaitable[None]]:
    async def attack(session: aiohttp.ClientSession, port: int) -> None:
        url = f"http://127.0.0.1:{port}/v1/functions/{function}/invoke"
        headers = {"Authorization": f"Bearer token-{tenant}-0123456789"}
        async with session.post(url, data=b"x", headers=headers) as r:
            await r.read()

    return attack


async def _auth_flood(session: aiohttp.ClientSession, port: int) -> None:
    url = f"http://127.0.0.1:{port}/v1/functions/echo/invoke"
    async with session.post(url, data=b"x", headers={"Authorization": "Bearer wrong-token-0000"}) as r:
        await r.read()


async def _slow_clients(port: int, stop: asyncio.Event, count: int = 2000) -> None:
    """Connections that dribble their headers, a byte a second, reopened when the shard cuts them."""

    async def one() -> None:
        while not stop.is_set():
            try:
                # From another loopback address: the per-source connection cap is the attacker's own.
                _, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER_ADDR, 0))
                writer.write(b"POST /v1/functions/echo/invoke HTTP/1.1\r\n")
                while not stop.is_set() and not writer.is_closing():
                    writer.write(b"X")
                    await writer.drain()
                    await asyncio.sleep(1)
                writer.close()
            except (OSError, ConnectionError):
                await asyncio.sleep(1.0)  # refused at accept (the per-source cap): try again later

    await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)


ATTACKS: dict[str, Callable[[aiohttp.ClientSession, int], Awaitable[None]] | None] = {
    "runaway": _invoker("runaway", "spin"),
    "memory": _invoker("memory", "bomb"),
    "table": _invoker("attack", "table"),
    "hostcalls": _invoker("attack", "hostcalls"),
    "logspam": _invoker("attack", "logspam"),
    "output": _invoker("attack", "output"),
    "slowclients": None,
    "authflood": _auth_flood,
}


async def _attack(name: str, port: int, stop_after_s: float) -> int:
    """Run one attack for `stop_after_s` seconds (in its own process: see _phase); returns calls made."""
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(stop_after_s, stop.set)
    calls = 0
    if name == "slowclients":
        await _slow_clients(port, stop)
        return 0
    fn = ATTACKS[name]
    assert fn is not None
    connector = aiohttp.TCPConnector(limit=ATTACKERS, force_close=name == "authflood")
    async with aiohttp.ClientSession(connector=connector) as attacker:

        async def loop() -> None:
            nonlocal calls
            while not stop.is_set():
                try:
                    await fn(attacker, port)
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(0.01)
                calls += 1

        await asyncio.gather(*(loop() for _ in range(ATTACKERS)))
    return calls


async def _phase(shard: Shard, attack: str | None) -> dict[str, Any]:
    # The attack runs in a process of its own: sharing this event loop, it would delay the
    # neighbour's requests before they ever reach the shard.
    proc = None
    if attack is not None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--attack", attack, "--port", str(shard.port),
            "--seconds", str(PHASE_S + 2), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(1.0)  # let the attack reach its steady state
    url = f"http://127.0.0.1:{shard.port}/v1/functions/echo/invoke"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as neighbour:
        log_before, dropped_before = shard.log_bytes, await _dropped_lines(neighbour, shard)
        latencies, errors = await _neighbour(neighbour, url, PHASE_S)
        dropped = await _dropped_lines(neighbour, shard) - dropped_before
    attack_calls = 0
    if proc is not None:
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        attack_calls = int(out.decode().strip() or 0)
    ms = sorted(x * 1000 for x in latencies)
    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 2),
        "errors": errors,
        "attack_calls": attack_calls,
        "rss_mib": round(shard.rss_mib(), 1),
        "log_kib": round((shard.log_bytes - log_before) / 1024, 1),
        "log_lines_dropped": dropped,
    }


async def _main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        shard = Shard(_tenants_file(Path(tmp)))
        drain = asyncio.create_task(_drain_stderr(shard))
        try:
            async with aiohttp.ClientSession() as session:
                await _wait_ready(session, shard)
            phases = {"idle": await _phase(shard, None)}
            for name in PHASES or ATTACKS:
                phases[name] = await _phase(shard, name)
            phases["idle-again"] = await _phase(shard, None)
        finally:
            shard.stop()
            drain.cancel()
    return phases


def run() -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    phases = asyncio.run(_main())
    base = phases["idle"]["p99_ms"] or 1e-9
    rows = [
        "| phase | neighbour P50 ms | P99 ms | P99 / idle | errors | attack calls | shard RSS MiB "
        "| log KiB | log lines dropped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    figures: dict[str, float] = {"idle_p50_ms": phases["idle"]["p50_ms"], "idle_p99_ms": base}
    for name, p in phases.items():
        ratio = p["p99_ms"] / base
        rows.append(
            f"| {name} | {p['p50_ms']} | {p['p99_ms']} | {ratio:.2f}x | {p['errors']} | {p['attack_calls']} "
            f"| {p['rss_mib']} | {p['log_kib']} | {p['log_lines_dropped']} |"
        )
        if name not in ("idle", "idle-again"):
            figures[f"{name}_p99_ratio"] = round(ratio, 2)
    figures["max_rss_mib"] = max(p["rss_mib"] for p in phases.values())
    return {
        "title": "Noisy neighbour: a tenant under attack from another on the same shard",
        "figures": figures,
        "targets": {f"{a}_p99_ratio": "<= 2" for a in PHASES or ATTACKS},
        "table": "\n".join(rows),
        "notes": (
            f"One shard process (CPU backend), neighbour echo 1 KiB at {RATE:.0f} req/s open loop for "
            f"{PHASE_S:.0f} s per phase, {ATTACKERS} attack loops; latency from each request's due time. "
            + (f"Shard flags: {' '.join(SHARD_ARGS)}. " if SHARD_ARGS else "")
            + f"Load average before the run: {load_before:.1f} on {os.cpu_count()} CPUs"
            + (
                ": the 2-core development box is shared with other engineers' builds and tests, so the "
                "tails are mostly their time slices (see the HTTP benchmark's notes on the same box)."
                if (os.cpu_count() or 1) <= 4
                else " (a quiet host: the GPU machine's CPUs, CPU backend)."
            )
        ),
        "phases": phases,
    }


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("--attack")
    parser.add_argument("--port", type=int)
    parser.add_argument("--seconds", type=float)
    args = parser.parse_args()
    if args.attack:
        print(asyncio.run(_attack(args.attack, args.port, args.seconds)))
    else:
        print(json.dumps(run(), indent=2))
