"""Issue 12's HTTP before/after: a shard of the landed base, of a 'before' commit and of an 'after'
commit (default HEAD), each from its own git worktree, same harness, same minutes.

Two measures. Timing on a shared 2-core box swings with the neighbours, so the first one counts
work instead of time, and is the same on a busy machine as on an idle one:
- work per invoke: N sequential keep-alive invokes of tenant alpha's `echo` against each shard,
  counted (a) as CPU instructions under valgrind's callgrind, per thread (the event loop; the
  tenant's invoke worker), and (b) as Python function calls and resumptions per invoke, per
  thread group, with the functions whose count differs between the trees;
- server CPU per invoke: closed loop with 32 connections (bench_http's), rounds interleaved
  between the shards and the bare aiohttp hello server (the same on every tree: the noise band).

    python bench/http_vs_base.py --before 847bfad~1 --rounds 5   # worktrees made in /tmp if missing

The shards run with `--audit-log off` (the base had no audit log; its cost is bench_http's).
Writes bench/results/http_vs_base.json and re-renders docs/performance.md. Not a `bench_*.py`:
`make bench` does not run it (it needs the other checkouts). `--counted` is internal: it runs a
shard under the call counter, driven over stdin.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import bench_http  # noqa: E402
import run as bench_run  # noqa: E402

BASE = "1604a50"
SOURCE_ROOTS = ("runtime", "operator", "dev", "api")
_INVOKE = (
    f"POST /v1/functions/echo/invoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bench_http.TOKEN}\r\n"
    f"Content-Type: application/octet-stream\r\nContent-Length: {len(bench_http.BODY)}\r\n\r\n"
).encode() + bench_http.BODY


def _git(*args: str, cwd: Path = ROOT.parent) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def _worktree(commit: str) -> tuple[Path, str]:
    sha = _git("rev-parse", "--short", commit)
    path = Path(f"/tmp/tensorwasm-http-{sha}")
    if not (path / "runtime" / "tensorwasm").is_dir():
        _git("worktree", "add", "--detach", str(path), sha)
    return path, sha


def _env(tree: Path) -> dict[str, str]:
    """The tree's source roots first: they shadow the ones this venv's .pth adds."""
    roots = [str(tree / r) for r in SOURCE_ROOTS if (tree / r).is_dir()]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(roots)}


def _start(tree: Path, prefix: list[str], command: list[str]) -> tuple[subprocess.Popen[str], int]:
    cmd = [*prefix, sys.executable, *command, "--tenants-file", str(tree / "examples" / "tenants.yaml")]
    cmd += ["--listen", "127.0.0.1:0", "--accelerator", "cpu", "--log-level", "info"]
    if (tree / "runtime" / "tensorwasm" / "runtime" / "audit.py").exists():
        cmd += ["--audit-log", "off"]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        cwd=tree, env=_env(tree), preexec_fn=bench_http._favoured(),
    )  # fmt: skip
    assert proc.stderr is not None
    while line := proc.stderr.readline():
        m = re.search(r"Runtime listening addr=[^ ]+:(\d+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # never a full pipe
            port = int(m.group(1))
            _ready(port)
            return proc, port
    proc.kill()
    raise RuntimeError(f"the shard of {tree} did not start")


def _ready(port: int) -> None:
    """Wait until an invoke answers 200 (a shard under valgrind loads its tenants in minutes)."""
    deadline = time.monotonic() + 900
    while True:
        try:
            _invoke(port, 1)
            return
        except (OSError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _invoke(port: int, n: int) -> None:
    """`n` invokes one after the other on one keep-alive connection (every answer a 200)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            sock.sendall(_INVOKE)
            buf = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("the shard closed the connection")
                buf += data
                end = buf.find(b"\r\n\r\n")
                m = re.search(rb"(?i)content-length: *(\d+)", buf[:end]) if end >= 0 else None
                if end >= 0 and len(buf) >= end + 4 + int(m.group(1) if m else 0):
                    break
            if not buf.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"invoke answered {buf[:120]!r}")


# --- work per invoke: instructions (callgrind) ---


def instructions_per_invoke(tree: Path, n: int, out: Path) -> dict[str, int]:
    """CPU instructions per invoke of the loop thread and of the tenant's worker under callgrind
    (instrumentation on for n/10 warm invokes, then zeroed, n counted, dumped per thread)."""
    for old in out.parent.glob(f"{out.name}.*"):
        old.unlink()
    prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes"]
    prefix.append(f"--callgrind-out-file={out}.%p")
    proc, port = _start(tree, prefix, ["-m", "tensorwasm.runtime"])
    try:
        _invoke(port, 200)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        _invoke(port, max(1, n // 10))
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        _invoke(port, n)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.kill()  # the dump is written; a shutdown under valgrind only costs minutes
        proc.wait()
    per_thread: dict[int, int] = {}
    for path in out.parent.glob(f"{out.name}.{proc.pid}.1-*"):  # the explicit dump, one file a thread
        text = path.read_text(errors="replace")
        thread = int(re.search(r"^thread: (\d+)", text, re.M).group(1))  # type: ignore[union-attr]
        per_thread[thread] = int(re.search(r"^summary: (\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    loop = per_thread.pop(1)
    worker = max(per_thread.values())  # the epoch ticker and the sweeps count time, not invokes
    return {"loop": round(loop / n), "worker": round(worker / n)}


# --- work per invoke: Python calls (a call counter in the shard process) ---


def _counted_main(argv: list[str]) -> None:
    """Run the shard with a per-thread call counter (sys.setprofile in every thread); stdin 'start'
    resets and counts, 'stop PATH' stops and writes {thread group: {function: calls}}."""
    import runpy

    active = False
    per: dict[int, tuple[str, dict[Any, int]]] = {}
    get_ident = threading.get_ident

    def group(name: str) -> str:
        return "loop" if name == "MainThread" else "worker" if name.startswith("invoke-") else "other"

    def prof(frame: Any, event: str, arg: Any) -> None:
        if not active:
            return
        if event == "call":  # a call or a coroutine's resumption
            key: Any = frame.f_code
        elif event == "c_call":
            owner = getattr(arg, "__module__", None) or type(getattr(arg, "__self__", None)).__name__
            key = (owner, getattr(arg, "__qualname__", "?"))
        else:
            return
        entry = per.get(get_ident())
        if entry is None:
            entry = per[get_ident()] = (group(threading.current_thread().name), {})
        entry[1][key] = entry[1].get(key, 0) + 1

    def name(key: Any) -> str:
        if isinstance(key, tuple):
            return f"[C] {key[0]}.{key[1]}"
        path = key.co_filename
        for cut in ("site-packages/", "/runtime/tensorwasm/", "/api/tensorwasm/", "/python3.11/"):
            path = path.split(cut, 1)[-1]
        return f"{path}:{key.co_qualname}"

    def control() -> None:
        nonlocal active
        for line in sys.stdin:
            cmd = line.split()
            if cmd[:1] == ["start"]:
                per.clear()
                active = True
            elif cmd[:1] == ["stop"]:
                active = False
                out: dict[str, dict[str, int]] = {}
                for grp, counts in list(per.values()):
                    for k, calls in list(counts.items()):
                        out.setdefault(grp, {})[name(k)] = out.get(grp, {}).get(name(k), 0) + calls
                Path(cmd[1]).write_text(json.dumps(out))

    threading.Thread(target=control, daemon=True, name="counter").start()
    threading.setprofile(prof)
    sys.setprofile(prof)
    sys.argv = ["tensorwasm.runtime", *argv]
    runpy.run_module("tensorwasm.runtime", run_name="__main__", alter_sys=True)


def calls_per_invoke(tree: Path, n: int, out: Path) -> dict[str, dict[str, float]]:
    """Python calls per invoke, {thread group: {function: calls}}."""
    out.unlink(missing_ok=True)
    proc, port = _start(tree, [], [str(Path(__file__).resolve()), "--counted"])
    assert proc.stdin is not None
    try:
        _invoke(port, 300)
        proc.stdin.write("start\n")
        proc.stdin.flush()
        time.sleep(0.5)  # the counter thread has read it
        _invoke(port, n)
        proc.stdin.write(f"stop {out}\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while not out.exists() or not out.read_text().endswith("}"):
            if time.monotonic() > deadline:
                raise RuntimeError("the counted shard wrote no counts")
            time.sleep(0.1)
    finally:
        bench_http._stop(proc)
    raw = json.loads(out.read_text())
    return {g: {f: c / n for f, c in fns.items()} for g, fns in raw.items()}


def _call_diff(a: dict[str, float], b: dict[str, float], top: int = 14) -> list[str]:
    keys = sorted(set(a) | set(b), key=lambda k: (-abs(b.get(k, 0) - a.get(k, 0)), k))
    return [
        f"{k} {a.get(k, 0):g} -> {b.get(k, 0):g}" for k in keys[:top] if abs(b.get(k, 0) - a.get(k, 0)) >= 0.5
    ]


# --- server CPU per invoke, interleaved ---


def cpu_ab(trees: dict[str, Path], rounds: int) -> dict[str, list[float]]:
    servers = {label: _start(tree, [], ["-m", "tensorwasm.runtime"]) for label, tree in trees.items()}
    hello = bench_http._start_hello()
    runs: dict[str, list[float]] = {label: [] for label in [*trees, "hello"]}
    try:
        order = [*trees, "hello"]
        for r in range(rounds):
            for label in order[r % len(order) :] + order[: r % len(order)]:  # rotate who goes first
                proc, port = hello if label == "hello" else servers[label]
                path, token = bench_http.HELLO if label == "hello" else bench_http.INVOKE
                result, cpu_us = bench_http._load_cpu(proc.pid, port, path, token)
                if set(result["statuses"]) != {"200"}:
                    raise RuntimeError(f"{label}: non-200 answers {result['statuses']}")
                runs[label].append(round(cpu_us, 1))
    finally:
        bench_http._stop(*(p for p, _ in servers.values()), hello[0])
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--before", required=True, help="the head before the fix")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--invokes", type=int, default=1000, help="counted sequential invokes per tree")
    parser.add_argument("--no-callgrind", action="store_true", help="skip the instruction counts")
    parser.add_argument("--load-note", default="", help="what else the machine was doing, for the notes")
    args = parser.parse_args()
    trees: dict[str, Path] = {}
    for role, commit in (("base", args.base), ("before", args.before), ("after", args.after)):
        path, sha = _worktree(commit)
        trees[f"{role} {sha}"] = path
    labels = list(trees)
    started = time.time()
    load = [Path("/proc/loadavg").read_text().split()[0]]
    work: dict[str, dict[str, Any]] = {}
    scratch = Path(f"/tmp/tensorwasm-http-vs-base-{os.getpid()}")
    scratch.mkdir(exist_ok=True)
    for label, tree in trees.items():
        calls = calls_per_invoke(tree, args.invokes, scratch / "calls.json")
        work[label] = {"calls": calls, **{f"calls_{g}": round(sum(c.values()), 1) for g, c in calls.items()}}
        if not args.no_callgrind and shutil.which("valgrind"):
            instr = instructions_per_invoke(tree, args.invokes, scratch / "cg")
            work[label].update({f"instructions_{k}": v for k, v in instr.items()})
    load.append(Path("/proc/loadavg").read_text().split()[0])
    cpu = cpu_ab(trees, args.rounds)
    load.append(Path("/proc/loadavg").read_text().split()[0])
    shutil.rmtree(scratch, ignore_errors=True)
    med = {label: statistics.median(v) for label, v in cpu.items()}
    figures: dict[str, Any] = {}
    for label in labels:
        role = label.split()[0]
        for key in ("instructions_loop", "instructions_worker", "calls_loop", "calls_worker"):
            if key in work[label]:
                figures[f"{role}_{key}"] = work[label][key]
        figures[f"{role}_server_cpu_us"] = med[label]
        figures[f"{role}_server_cpu_us_min"] = min(cpu[label])  # neighbours only ever add
    figures["hello_server_cpu_us"] = med["hello"]
    figures["hello_server_cpu_us_min"] = min(cpu["hello"])
    for role in ("before", "after"):
        if "base_instructions_loop" in figures:
            figures[f"{role}_over_base_instructions_loop"] = round(
                figures[f"{role}_instructions_loop"] / figures["base_instructions_loop"], 3
            )
        figures[f"{role}_over_base_server_cpu"] = round(figures[f"{role}_server_cpu_us"] / med[labels[0]], 3)
    cols = ("instructions_loop", "instructions_worker", "calls_loop", "calls_worker")
    table = (
        "| shard | loop thread instructions/invoke | worker instructions/invoke | loop Python calls/invoke "
        "| worker Python calls/invoke | server CPU us/invoke (median) | each round |\n|" + "---|" * 7 + "\n"
    )
    for label in [*labels, "hello"]:
        counts = " | ".join(str(work.get(label, {}).get(c, "")) for c in cols)
        table += f"| {label} | {counts} | {med[label]} | {', '.join(map(str, cpu[label]))} |\n"
    table += "\nPython calls per invoke that differ (loop thread, then worker):\n\n"
    for prev, label in itertools.pairwise(labels):
        for grp in ("loop", "worker"):
            diff = _call_diff(work[prev]["calls"].get(grp, {}), work[label]["calls"].get(grp, {}))
            table += f"- {prev} -> {label}, {grp}: " + ("; ".join(diff) or "none") + "\n"
    record = {
        "name": "http_vs_base",
        "title": "HTTP invoke: this session's head against the landed base (issue 12)",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": round(time.time() - started, 1),
        "hardware": bench_run.hardware(),
        "versions": bench_run.versions(),
        "notes": (
            f"`python bench/http_vs_base.py --before {args.before} --after {args.after} "
            f"--rounds {args.rounds}`: shards of the "
            f"landed base, of the head before the fix and after it ({', '.join(labels)}), each from its own "
            f"git worktree, audit log off. Work per invoke: {args.invokes} sequential keep-alive invokes of "
            "echo, counted as CPU instructions under callgrind (user space: the kernel's socket work is "
            "not in them) and as Python calls and coroutine resumptions, per thread; the same on a busy "
            "machine. Server CPU per invoke: closed loop, 32 connections, interleaved rounds with the "
            f"hello server as the noise band. Load average {' -> '.join(load)} on 2 cores. " + args.load_note
        ),
        "table": table,
        "figures": figures,
    }
    out = bench_run.RESULTS / "http_vs_base.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    bench_run.PAGE.write_text(bench_run.render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--counted"]:
        _counted_main(sys.argv[2:])
    else:
        sys.exit(main())
