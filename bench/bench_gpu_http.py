"""A tenant's GPU kernel invoked over HTTP, end to end, with many tenants, beside the raw driver.

One runtime shard process (`python -m tensorwasm.runtime --tenants-file ...`, CUDA backend when
there is a GPU) serves N tenants of `bench/fixtures/gpu_step.wat`: `step` launches the built-in
vector_add on the tenant's own 4 KiB buffer and syncs its stream (request -> auth -> queue -> wasm ->
host call -> launch -> sync -> response); `noop` is the same HTTP path without GPU work. In the same
run and on the same GPU, the bench process times a raw cuLaunchKernel + cuStreamSynchronize of the
same kernel (and TenantDevice.launch + sync, the in-process path the host call takes).
- serial: one keep-alive connection, requests round-robin over every tenant, step and noop blocks
  interleaved; the GPU work's share of an HTTP invoke is P50(step) - P50(noop), compared with raw
  launch + sync (target <= 1.3x);
- concurrent: closed loop, 32 connections from 4 generator processes over every tenant, 5 s each.
Helpers here (tenants file, runtime process, load generator) are shared with bench_density.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "bench" / "fixtures" / "gpu_step.wat"
_CONTENT_LENGTH = re.compile(rb"(?i)content-length: *(\d+)")


# --- the runtime process ---


def write_tenants(directory: Path, count: int, gpu_memory: str = "16Mi") -> Path:
    """A tenants file of `count` tenants of gpu_step.wat (tokens tok-<i>, names t<i>)."""
    sha = hashlib.sha256(MODULE.read_bytes()).hexdigest()
    lines = ["tenants:"]
    for i in range(count):
        lines += [
            f"  - name: t{i}",
            f"    token: tok-{i:06d}-bench-gpu-http",
            f"    module: {{path: {MODULE}, sha256: {sha}}}",
            "    functions: [step, noop]",
            f"    limits: {{gpuMemory: {gpu_memory}, linearMemory: 1Mi, timeoutMs: 2000, maxConcurrency: 1, "
            "queueLength: 256}",
        ]
    path = directory / f"tenants-{count}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def token(i: int) -> str:
    return f"tok-{i:06d}-bench-gpu-http"


class Runtime:
    """A runtime shard process on an ephemeral port; `ready_s` is start -> /readyz 200."""

    def __init__(
        self, tenants: Path, accelerator: str, workdir: Path, env: dict[str, str] | None = None
    ) -> None:
        cmd = [
            sys.executable, "-m", "tensorwasm.runtime", "--tenants-file", str(tenants), "--listen",
            "127.0.0.1:0", "--accelerator", accelerator, "--cache-dir", str(workdir / "cache"),
        ]  # fmt: skip
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.lines: list[str] = []
        found = threading.Event()
        self.port = self.admin_port = 0

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"Runtime listening addr=\S+?:(\d+)(?: admin=\S+?:(\d+))?", line)
                if m and not self.port:
                    self.port = int(m.group(1))
                    # Readiness detail (loaded tenants) is on the admin listener where there is one.
                    self.admin_port = int(m.group(2)) if m.group(2) else self.port
                    found.set()
            found.set()  # it exited before listening: say so now, not after the timeout

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(300) or not self.port:
            self.stop()
            raise RuntimeError("runtime did not start:\n" + "".join(self.lines[-30:]))
        self.ready_s = self._wait_ready()

    def _wait_ready(self) -> float:
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=30) as r:
                    if r.status == 200:
                        self.detail = json.loads(r.read())
                        return time.perf_counter() - self.started
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("runtime exited:\n" + "".join(self.lines[-30:]))
            time.sleep(0.05)  # polling an external process's readiness: no event to wait on
        raise RuntimeError("runtime never became ready")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- HTTP client: raw keep-alive sockets (http.client costs more than the server's work) ---


def request_bytes(function: str, tok: str) -> bytes:
    return (
        f"POST /v1/functions/{function}/invoke HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {tok}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class Conn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def call(self, req: bytes) -> int:
        self.sock.sendall(req)
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                m = _CONTENT_LENGTH.search(buf, 0, end)
                total = end + 4 + (int(m.group(1)) if m else 0)
                if len(buf) >= total:
                    status = int(buf[9:12])
                    del buf[:total]
                    return status
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            buf += data


def drive(port: int, reqs: list[bytes], threads: int, duration: float, rate: float = 0.0) -> dict[str, Any]:
    """Closed loop (rate 0) or open loop at `rate` req/s in total over `threads` connections; each
    thread walks `reqs` round-robin from its own offset. Open-loop latency counts from the intended
    send time (a late request is charged its lateness)."""
    lat: list[list[float]] = [[] for _ in range(threads)]
    statuses: list[dict[int, int]] = [{} for _ in range(threads)]
    start = time.perf_counter() + 0.05
    stop_at = start + duration

    def worker(k: int) -> None:
        conn = Conn(port)
        i = k * max(1, len(reqs) // threads)
        interval = threads / rate if rate else 0.0
        nxt = start + k * interval / threads
        clock = time.perf_counter
        while True:
            now = clock()
            if rate:
                if nxt >= stop_at:
                    break
                if nxt > now:
                    time.sleep(nxt - now)
                t0 = nxt
                nxt += interval
            else:
                if now >= stop_at:
                    break
                t0 = now
            status = conn.call(reqs[i % len(reqs)])
            lat[k].append(clock() - t0)
            statuses[k][status] = statuses[k].get(status, 0) + 1
            i += 1

    ths = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    merged: dict[int, int] = {}
    for st in statuses:
        for code, n in st.items():
            merged[code] = merged.get(code, 0) + n
    return {"lat": [x for part in lat for x in part], "status": merged, "duration": duration}


def drive_processes(
    port: int, reqs: list[bytes], processes: int, threads: int, duration: float, rate: float = 0.0
) -> dict[str, Any]:
    """`drive` in `processes` generator processes (this file with --load), results merged."""
    return drive_targets([(port, reqs)] * processes, threads, duration, rate)


def drive_targets(
    targets: list[tuple[int, list[bytes]]], threads: int, duration: float, rate: float = 0.0
) -> dict[str, Any]:
    """One generator process per (port, requests) target, all at once, `rate` shared evenly; merged."""
    files = []
    for port, reqs in targets:
        spec = json.dumps({"port": port, "reqs": [r.decode() for r in reqs], "threads": threads,
                           "duration": duration, "rate": rate / len(targets)})  # fmt: skip
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write(spec)  # a file, not argv: a thousand tenants' requests pass the argument limit
        files.append(f.name)
    procs = [
        subprocess.Popen([sys.executable, __file__, "--load", name], stdout=subprocess.PIPE, text=True)
        for name in files
    ]
    lat: list[float] = []
    status: dict[int, int] = {}
    for p in procs:
        out, _ = p.communicate(timeout=duration + 120)
        part = json.loads(out)
        lat += part["lat"]
        for code, n in part["status"].items():
            status[int(code)] = status.get(int(code), 0) + n
    for name in files:
        os.unlink(name)
    return {"lat": lat, "status": status, "duration": duration}


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] * 1e6 if s else float("nan")


# --- the raw baseline, in this process, on the same GPU ---


def raw_launch_sync(n_calls: int = 5000) -> dict[str, float]:
    """P50 us of raw cuLaunchKernel + cuStreamSynchronize of vector_add (n = 1024, grid 4 x 256), and of
    TenantDevice.launch + sync (what the gpu_launch / gpu_sync host calls run); {} without a GPU."""
    try:
        import ctypes

        from cuda.bindings import driver as cu

        from tensorwasm.runtime.accel.base import KernelArg
        from tensorwasm.runtime.accel.cuda import CudaAccelerator
    except ImportError:
        return {}
    try:
        acc = CudaAccelerator(0, cache_dir=Path(tempfile.mkdtemp(prefix="tw-bench-kernels-")))
    except Exception:
        return {}
    try:
        dev = acc.open_tenant("raw", 16 << 20)
        h = dev.alloc(4096)
        func = dev._kernels["vector_add"].func
        addr = int(dev._bufs[h][0])
        params = (
            (addr, addr, addr, 1024),
            (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32),
        )
        stream = dev.stream
        args = [KernelArg("buffer", h)] * 3 + [KernelArg("u32", 1024)]

        def raw() -> None:
            cu.cuLaunchKernel(func, 4, 1, 1, 256, 1, 1, 0, stream, params, 0)
            cu.cuStreamSynchronize(stream)

        def ours() -> None:
            dev.launch("vector_add", (4, 1, 1), (256, 1, 1), args)
            dev.sync()

        t_raw: list[float] = []
        t_ours: list[float] = []
        clock = time.perf_counter
        for _ in range(5):  # interleaved rounds
            for fn, samples in ((raw, t_raw), (ours, t_ours)):
                for _ in range(200):
                    fn()
                for _ in range(n_calls // 5):
                    t0 = clock()
                    fn()
                    samples.append(clock() - t0)
        out: dict[str, float] = {
            "raw_launch_sync_p50_us": pct(t_raw, 0.5),
            "inprocess_launch_sync_p50_us": pct(t_ours, 0.5),
        }
        # The same raw call after the GPU sat idle 300 us (as it does between serial HTTP requests).
        t_idle: list[float] = []
        for _ in range(2000):
            until = clock() + 300e-6
            while clock() < until:
                pass
            t0 = clock()
            raw()
            t_idle.append(clock() - t0)
        out["raw_launch_sync_after_idle_p50_us"] = pct(t_idle, 0.5)
        out |= _engine_invokes(acc)
        out |= _thread_hops(acc, cu)
        return out
    finally:
        acc.close()


def _thread_hops(acc: Any, cu: Any, threads: int = 64, calls: int = 3000) -> dict[str, float]:
    """The runtime's shape without wasm or HTTP: one worker thread per tenant, work handed over through
    a SimpleQueue round-robin, timed from hand-off to done. Work: nothing, TenantDevice.launch + sync,
    and launch + a cuStreamQuery spin instead of cuStreamSynchronize. With 1 thread and `threads`."""
    import queue as queue_mod

    from tensorwasm.runtime.accel.base import KernelArg

    devs = [acc.open_tenant(f"hop-{i}", 16 << 20) for i in range(threads)]
    handles = [d.alloc(4096) for d in devs]
    args = [[KernelArg("buffer", h)] * 3 + [KernelArg("u32", 1024)] for h in handles]

    def launch_sync(i: int) -> None:
        devs[i].launch("vector_add", (4, 1, 1), (256, 1, 1), args[i])
        devs[i].sync()

    def launch_spin(i: int) -> None:
        devs[i].launch("vector_add", (4, 1, 1), (256, 1, 1), args[i])
        stream = devs[i].stream
        while cu.cuStreamQuery(stream)[0] != cu.CUresult.CUDA_SUCCESS:
            pass

    works: dict[str, Any] = {"noop": lambda i: None, "launch_sync": launch_sync, "launch_spin": launch_spin}
    out: dict[str, float] = {}
    for n in (1, threads):
        inboxes: list[queue_mod.SimpleQueue[Any]] = [queue_mod.SimpleQueue() for _ in range(n)]
        done: queue_mod.SimpleQueue[float] = queue_mod.SimpleQueue()

        def worker(k: int, inbox: queue_mod.SimpleQueue[Any], done: queue_mod.SimpleQueue[float]) -> None:
            while (item := inbox.get()) is not None:
                item(k)
                done.put(time.perf_counter())

        ths = [threading.Thread(target=worker, args=(k, inboxes[k], done), daemon=True) for k in range(n)]
        for th in ths:
            th.start()
        for name, fn in works.items():
            samples = []
            for j in range(calls + 200):
                t0 = time.perf_counter()
                inboxes[j % n].put(fn)
                t1 = done.get()
                if j >= 200:
                    samples.append(t1 - t0)
            out[f"hop_{name}_{n}threads_p50_us"] = pct(samples, 0.5)
        for inbox in inboxes:
            inbox.put(None)
        for th in ths:
            th.join()
    for i in range(threads):
        acc.close_tenant(f"hop-{i}")
    return out


def _engine_invokes(acc: Any, tenants: int = 16) -> dict[str, float]:
    """The wasm side without HTTP: TenantInstancePool.invoke of step and noop on this thread, round-robin
    over `tenants` tenants of gpu_step.wat (guest call + host calls + launch + sync + reset)."""
    from tensorwasm.runtime.engine import Engine, GuestLimits, TenantInstancePool

    engine = Engine()
    data = MODULE.read_bytes()
    module = engine.compile(data, hashlib.sha256(data).hexdigest())
    pools = []
    try:
        for i in range(tenants):
            dev = acc.open_tenant(f"engine-{i}", 16 << 20)
            pools.append(TenantInstancePool(engine, module, GuestLimits(memory_bytes=1 << 20), device=dev,
                                            tenant_id=f"engine-{i}"))  # fmt: skip
        times: dict[str, list[float]] = {"step": [], "noop": []}
        clock = time.perf_counter
        for rnd in range(6):
            for fn in ("step", "noop"):
                for j in range(500):
                    pool = pools[(rnd * 500 + j) % tenants]
                    t0 = clock()
                    pool.invoke(fn, b"")
                    times[fn].append(clock() - t0)
        return {f"engine_{fn}_p50_us": pct(t, 0.5) for fn, t in times.items()}
    finally:
        for i, pool in enumerate(pools):
            pool.close()
            acc.close_tenant(f"engine-{i}")
        engine.close()


def _serial(port: int, tenants: int, label: str) -> dict[str, float]:
    conn = Conn(port)
    times: dict[str, list[float]] = {"step": [], "noop": []}
    for rnd in range(6):
        for fn in ("step", "noop"):
            for j in range(300):
                req = request_bytes(fn, token((rnd * 300 + j) % tenants))
                t0 = time.perf_counter()
                conn.call(req)
                times[fn].append(time.perf_counter() - t0)
    conn.sock.close()
    return {f"http_{label}{fn}_p50_us": round(pct(t[200:], 0.5), 1) for fn, t in times.items()}


def run() -> dict[str, Any]:
    tenants = int(os.environ.get("TENSORWASM_BENCH_GPU_HTTP_TENANTS", "64"))
    accelerator = os.environ.get("TENSORWASM_BENCH_ACCELERATOR", "auto")
    work = Path(tempfile.mkdtemp(prefix="tw-bench-gpu-http-"))
    rt = Runtime(write_tenants(work, tenants), accelerator, work)
    figures: dict[str, float] = {}
    try:
        backend = (rt.detail.get("accelerator") or {}).get("mps", "?")
        step = [request_bytes("step", token(i)) for i in range(tenants)]
        noop = [request_bytes("noop", token(i)) for i in range(tenants)]
        conn = Conn(rt.port)
        for r in step + noop:  # every tenant warm once
            assert conn.call(r) == 200, "a warm-up invoke failed"
        t_step: list[float] = []
        t_noop: list[float] = []
        clock = time.perf_counter
        for rnd in range(10):  # interleaved blocks: drift hits both alike
            for reqs, out in ((step, t_step), (noop, t_noop)):
                for j in range(400):
                    req = reqs[(rnd * 400 + j) % tenants]
                    t0 = clock()
                    status = conn.call(req)
                    out.append(clock() - t0)
                    assert status == 200, f"invoke answered {status}"
        one: dict[str, list[float]] = {"step": [], "noop": []}
        for _ in range(4):  # one tenant only: the same worker thread every time
            for fn in ("step", "noop"):
                req = request_bytes(fn, token(0))
                for _ in range(400):
                    t0 = clock()
                    conn.call(req)
                    one[fn].append(clock() - t0)
        for fn, samples in one.items():
            figures[f"http_{fn}_1tenant_p50_us"] = round(pct(samples, 0.5), 1)
        conn.sock.close()
        step_p50, noop_p50 = pct(t_step, 0.5), pct(t_noop, 0.5)
        figures |= {
            "http_step_p50_us": round(step_p50, 1), "http_step_p99_us": round(pct(t_step, 0.99), 1),
            "http_noop_p50_us": round(noop_p50, 1), "http_noop_p99_us": round(pct(t_noop, 0.99), 1),
            "http_gpu_share_p50_us": round(step_p50 - noop_p50, 1),
        }  # fmt: skip
        for name, reqs in (("step", step), ("noop", noop)):
            res = drive_processes(rt.port, reqs, processes=4, threads=8, duration=5.0)
            ok = res["status"].get(200, 0)
            figures[f"concurrent_{name}_rps"] = round(ok / res["duration"], 1)
            figures[f"concurrent_{name}_p50_us"] = round(pct(res["lat"], 0.5), 1)
            figures[f"concurrent_{name}_p99_us"] = round(pct(res["lat"], 0.99), 1)
            figures[f"concurrent_{name}_errors"] = sum(n for c, n in res["status"].items() if c != 200)
        figures["runtime_rss_mib"] = round(rt.rss_bytes() / (1 << 20), 1)
    finally:
        rt.stop()
    # The same serial measurement with more hardware queues (the driver multiplexes streams onto
    # CUDA_DEVICE_MAX_CONNECTIONS of them, 8 by default): does stream aliasing explain the gap?
    rt = Runtime(write_tenants(work, tenants), accelerator, work, env={"CUDA_DEVICE_MAX_CONNECTIONS": "32"})
    try:
        figures |= _serial(rt.port, tenants, "maxconn32_")
    finally:
        rt.stop()
    raw = raw_launch_sync()
    targets = {}
    if raw:
        figures |= {k: round(v, 2) for k, v in raw.items()}
        figures["http_gpu_share_over_raw"] = round(
            figures["http_gpu_share_p50_us"] / raw["raw_launch_sync_p50_us"], 2
        )
        figures["inprocess_over_raw"] = round(
            raw["inprocess_launch_sync_p50_us"] / raw["raw_launch_sync_p50_us"], 2
        )
        figures["http_step_over_raw"] = round(figures["http_step_p50_us"] / raw["raw_launch_sync_p50_us"], 1)
        targets["http_gpu_share_over_raw"] = "<= 1.3"
    return {
        "title": "GPU kernel over HTTP, end to end, many tenants (vs raw launch + sync)",
        "figures": figures,
        "targets": targets,
        "notes": (
            f"{tenants} tenants of bench/fixtures/gpu_step.wat in one runtime process (accelerator "
            f"{accelerator}, MPS {backend}); step = vector_add n=1024 on the tenant's buffer + stream sync, "
            "noop = the same HTTP path without GPU work. Serial: one keep-alive connection, round-robin "
            "over the tenants, 10 interleaved blocks of 400 each; http_gpu_share = P50(step) - P50(noop), "
            "the GPU work's share of an invoke, against raw cuLaunchKernel + cuStreamSynchronize of the "
            "same kernel in the bench process (same GPU, same run). Concurrent: closed loop, 4 generator "
            "processes x 8 connections, 5 s, every tenant. Where the time goes: engine_* = "
            "TenantInstancePool.invoke in the bench process (wasm + host calls, no HTTP); hop_* = a "
            "SimpleQueue hand-off to one worker thread per tenant (the runtime's shape) doing nothing, "
            "TenantDevice.launch + sync, or launch + a cuStreamQuery spin, with 1 and 64 threads; "
            "http_maxconn32_* = the serial run again with CUDA_DEVICE_MAX_CONNECTIONS=32."
        ),
    }


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--load":
    spec = json.loads(Path(sys.argv[2]).read_text())
    out = drive(
        spec["port"], [r.encode() for r in spec["reqs"]], spec["threads"], spec["duration"], spec["rate"]
    )
    json.dump(out, sys.stdout)
