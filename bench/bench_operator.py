"""Operator throughput: N Tenants (500 unless TENSORWASM_BENCH_OPERATOR_TENANTS says otherwise) applied at
once until all are Placed and Ready, on the real control plane.

Baseline: the time to merely create the same N objects (one `kubectl apply` of a List, no operator).
Then the LocalStack (the operator and 2 real CPU runtime shard processes) runs in a fresh namespace
and the same List is applied; clocks stop when every Tenant is Placed, then when every Tenant is
Ready (its shard loaded the module and reported it). Three operator runs interleaved with four plain
creates on a control plane of the benchmark's own, each step on a quiet cluster; medians reported.
Also reports the operator's peak RSS (VmHWM), its API writes, CPU per tenant by process and the API
server's requests per tenant by kind.

`compare_operators` runs the same steps for several operator trees (another checkout's operator on
PYTHONPATH, the shards and the control plane this tree's) interleaved on one control plane:
bench/operator_vs_base.py uses it for issue 12's before/after.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime

from tensorwasm.dev.cluster import ClusterState, LocalControlPlane, default_state_dir
from tensorwasm.dev.procstat import cpu_seconds
from tensorwasm.dev.stack import LocalStack

REPO = Path(__file__).resolve().parents[1]
N = int(os.environ.get("TENSORWASM_BENCH_OPERATOR_TENANTS", "500"))
ECHO = REPO / "tests" / "fixtures" / "echo.wat"


def _module() -> tuple[str, str]:
    """The echo module as a ConfigMap (JSON) and its sha256."""
    wasm = bytes(wasmtime.wat2wasm(ECHO.read_text()))
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "bench-module"},
        "binaryData": {"module.wasm": base64.b64encode(wasm).decode()},
    }
    return json.dumps(cm), hashlib.sha256(wasm).hexdigest()


def _manifest(sha: str, n: int = N) -> str:
    items = [
        {
            "apiVersion": "tensorwasm.io/v1alpha1",
            "kind": "Tenant",
            "metadata": {"name": f"b{i:03d}"},
            "spec": {
                "module": {"configMapRef": {"name": "bench-module", "key": "module.wasm"}, "sha256": sha},
                "functions": ["echo"],
                "limits": {"gpuMemory": "16Mi", "linearMemory": "1Mi", "maxConcurrency": 1},
            },
        }
        for i in range(n)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


OPERATOR_RUNS = 3
SETTLE_TIMEOUT_S = 300
QUIET_TIMEOUT_S = 60
# Leases, node heartbeats and these polls themselves: an idle local control plane serves fewer.
QUIET_REQUESTS_PER_S = 30


def settle(k: Callable[..., str], state: ClusterState) -> None:
    """Wait until no bench namespace exists and the API server is quiet again.

    Deleting a namespace of 500 Tenants is background work for the control plane that goes on after
    the namespace is gone (the controller-manager deleting Endpoints, the garbage collector checking
    owners): a measurement started during it pays for it.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while any(n.startswith("namespace/bench-") for n in k("get", "namespaces", "-o", "name").split()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench namespaces still present after {SETTLE_TIMEOUT_S} s")
        time.sleep(1.0)
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    before = sum(api_requests(state.server, state.token).values())
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = sum(api_requests(state.server, state.token).values())
        if now - before <= QUIET_REQUESTS_PER_S:
            return
        before = now
    print(f"API server not quiet after {QUIET_TIMEOUT_S} s; measuring anyway", file=sys.stderr)


def api_requests(server: str, token: str) -> Counter[str]:
    """The API server's request counters (apiserver_request_total) as 'VERB resource[/sub]' -> count."""
    req = urllib.request.Request(f"{server}/metrics", headers={"Authorization": f"Bearer {token}"})
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # our own 127.0.0.1 server
    with urllib.request.urlopen(req, context=context, timeout=10) as resp:
        text = resp.read().decode()
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            resource = "/".join(filter(None, (labels.get("resource"), labels.get("subresource"))))
            counts[f"{labels.get('verb')} {resource}"] += int(float(line.rsplit(" ", 1)[1]))
    return counts


class CpuMeter:
    """CPU seconds each named process (and the kubectl children we waited for) spent in a window,
    and the API requests served in it."""

    def __init__(self, pids: dict[str, int], server: str, token: str) -> None:
        self.pids, self.server, self.token = pids, server, token
        self.start_at: dict[str, float] = {}
        self.spent: dict[str, float] = {}
        self.requests_at: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()

    def _now(self) -> dict[str, float]:
        now = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        now["kubectl"] = children.ru_utime + children.ru_stime
        return now

    def start(self) -> None:
        self.requests_at = api_requests(self.server, self.token)
        self.start_at = self._now()

    def stop(self) -> None:
        self.spent = {k: v - self.start_at[k] for k, v in self._now().items()}
        self.requests = api_requests(self.server, self.token) - self.requests_at


def time_plain_create(
    k: Callable[..., str], state: ClusterState, namespace: str, manifest: str, meter: CpuMeter
) -> tuple[float, dict[str, float], Counter[str]]:
    """The baseline: seconds for one `kubectl apply` of the List with no operator running; CPU; requests."""
    k("create", "namespace", namespace)
    meter.start()
    t0 = time.perf_counter()
    k("apply", "-n", namespace, "-f", "-", stdin=manifest)
    took = time.perf_counter() - t0
    meter.stop()
    k("delete", "namespace", namespace, "--wait=false")
    settle(k, state)
    return took, meter.spent, meter.requests


WATCH_FORMAT = 'jsonpath={.metadata.name}{" "}{.status.phase}{"\\n"}'
PLACED, READY = ("Placed", "Ready"), ("Ready",)


class TenantWatch:
    """Phases of the namespace's Tenants from one `kubectl get --watch`; stamps when all are Placed/Ready."""

    def __init__(self, cmd: list[str], on_all_ready: Callable[[], None], n: int = N) -> None:
        self.on_all_ready, self.n = on_all_ready, n
        self.phases: dict[str, str] = {}
        self.placed_at: float | None = None
        self.ready_at: float | None = None
        self.all_ready = threading.Event()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def count(self, phases: tuple[str, ...]) -> int:
        return sum(1 for p in list(self.phases.values()) if p in phases)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            name, _, phase = line.strip().partition(" ")
            if not name:
                continue
            self.phases[name] = phase
            if self.placed_at is None and self.count(PLACED) == self.n:
                self.placed_at = time.perf_counter()
            if self.ready_at is None and self.count(READY) == self.n:
                self.ready_at = time.perf_counter()
                self.on_all_ready()
                self.all_ready.set()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def fresh_control_plane() -> Iterator[tuple[ClusterState, Path]]:
    """A control plane of its own, started empty and removed afterwards: an API server and etcd that
    served earlier runs (or the test suite) carry their history, and runs stop being comparable."""
    state_dir = Path(
        os.environ.get("TENSORWASM_BENCH_CLUSTER_DIR", default_state_dir().parent / "bench-cluster")
    )
    plane = LocalControlPlane(state_dir, log=lambda m: print(m, file=sys.stderr))
    plane.down()
    state = plane.up(nodes=3, gpus_per_node=1, timeout_s=180)
    try:
        yield state, state_dir
    finally:
        plane.down()


def run() -> dict[str, Any]:
    with fresh_control_plane() as (state, state_dir):
        return measure(state, state_dir)


def _profile(pid: int, namespace: str) -> subprocess.Popen[bytes] | None:
    """With TENSORWASM_BENCH_OPERATOR_PYSPY=<dir>, py-spy samples the operator from the apply until
    all Ready into <dir>/<namespace>.txt (collapsed stacks, CPU only). Off by default: it costs CPU."""
    out = os.environ.get("TENSORWASM_BENCH_OPERATOR_PYSPY")
    if not out:
        return None
    Path(out).mkdir(parents=True, exist_ok=True)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [pyspy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--nonblocking",
           "-o", str(Path(out) / f"{namespace}.txt")]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass
class OperatorRun:
    applied_s: float
    placed_s: float
    ready_s: float | None  # None: not all Ready within ready_after_placed_s (compare_operators)
    rss_kib: int
    cpu_s: dict[str, float]
    requests: Counter[str]
    writes: str


def time_operator_run(
    k: Callable[..., str],
    state: ClusterState,
    namespace: str,
    manifest: str,
    module_cm: str,
    workdir: Path,
    n: int = N,
    operator_env: dict[str, str] | None = None,
    ready_after_placed_s: float | None = None,
) -> OperatorRun:
    """The operator and 2 shards in a fresh namespace; the same List applied; until all are Ready.

    `operator_env` adds to the operator process's environment only (PYTHONPATH: another tree's
    operator). With `ready_after_placed_s`, a run whose Tenants are all Placed but not all Ready that
    long after is recorded with ready_s None instead of failing (an old operator with new shards).
    """
    kubectl = [str(Path(state.bin_dir) / "kubectl"), f"--kubeconfig={state.kubeconfig}"]
    k("create", "namespace", namespace)
    k("apply", "-n", namespace, "-f", "-", stdin=module_cm)
    shutil.rmtree(workdir, ignore_errors=True)
    stack = LocalStack(
        Path(state.kubeconfig), namespace, workdir, shards=2,
        operator_env={
            "TENSORWASM_OPERATOR_SHARD_MAX_TENANTS": "400",
            "TENSORWASM_OPERATOR_SHARD_HOST_MEMORY": "512Gi",
            **(operator_env or {}),
        },
    )  # fmt: skip
    stack.start()
    proc = stack.processes["operator"].proc
    log_path = stack.processes["operator"].log_path
    try:
        deadline = time.monotonic() + 60
        while b"Started namespace=" not in log_path.read_bytes():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"operator did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        # One watch stream (a single kubectl process) instead of polling: a poll every 0.2 s started
        # a kubectl process and listed 500 Tenants each time, CPU the baseline apply never paid.
        stack_pids = {name: p.proc.pid for name, p in stack.processes.items()}
        meter = CpuMeter({**state.pids, **stack_pids}, state.server, state.token)
        cmd = [*kubectl, "get", "tenants", "-n", namespace, "--watch", "-o", WATCH_FORMAT]
        watch = TenantWatch(cmd, on_all_ready=meter.stop, n=n)
        profile = _profile(proc.pid, namespace)
        try:
            meter.start()
            t0 = time.perf_counter()
            k("apply", "-n", namespace, "-f", "-", stdin=manifest)
            applied_s = time.perf_counter() - t0
            while not watch.all_ready.wait(0.5):
                stack.check_alive()
                if time.perf_counter() - t0 > 900:
                    raise RuntimeError(f"only {watch.count(READY)}/{n} Ready after 900 s")
                if (
                    ready_after_placed_s is not None
                    and watch.placed_at is not None
                    and time.perf_counter() - watch.placed_at > ready_after_placed_s
                ):
                    meter.stop()
                    break
        finally:
            watch.stop()
            if profile is not None:
                profile.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
                profile.wait(timeout=60)
        assert watch.placed_at is not None
        if watch.ready_at is not None:
            phases = k("get", "tenants", "-n", namespace, "-o", "jsonpath={.items[*].status.phase}").split()
            if phases.count("Ready") != n:  # the watch's view, checked once against a list
                raise RuntimeError(f"watch saw all Ready, a list says {phases.count('Ready')}/{n}")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
        # Delete while the operator runs, so its finalizer is released and the namespace can go.
        k("delete", "tenants", "--all", "-n", namespace, "--wait=false")
        deadline = time.monotonic() + 120
        while k("get", "tenants", "-n", namespace, "-o", "name").strip() and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stack.stop()
    writes_line = [line for line in log_path.read_text().splitlines() if "Stopped writes=" in line]
    k("delete", "namespace", namespace, "--wait=false")
    settle(k, state)
    return OperatorRun(
        applied_s, watch.placed_at - t0, None if watch.ready_at is None else watch.ready_at - t0, rss_kib,
        meter.spent, meter.requests,
        writes_line[-1].split("Stopped ", 1)[-1] if writes_line else "n/a",
    )  # fmt: skip


def prepare(state: ClusterState) -> Callable[..., str]:
    """kubectl on the bench cluster, with this tree's CRDs applied and the API server quiet."""
    kubectl = [str(Path(state.bin_dir) / "kubectl"), f"--kubeconfig={state.kubeconfig}"]

    def k(*args: str, stdin: str | None = None) -> str:
        return subprocess.run(
            [*kubectl, *args], input=stdin, capture_output=True, text=True, check=True
        ).stdout

    crds = [a for c in sorted((REPO / "crds").glob("*.yaml")) for a in ("-f", str(c))]
    k("apply", "--server-side", "--force-conflicts", *crds)
    k("wait", "--for=condition=Established", "--timeout=60s", *crds)
    # A namespace still being deleted (an earlier run's 500 Tenants, Services, Secrets) keeps the
    # controller-manager and the API server busy: start from a quiet cluster.
    settle(k, state)
    return k


def measure(state: ClusterState, state_dir: Path) -> dict[str, Any]:
    k = prepare(state)
    stamp = str(int(time.time()))
    module_cm, sha = _module()
    manifest = _manifest(sha)
    plane_meter = CpuMeter(dict(state.pids), state.server, state.token)
    # Warm-up, not counted: the first apply into a just-started API server runs 1.5x slower.
    time_plain_create(k, state, f"bench-create-{stamp}-warmup", manifest, plane_meter)
    # Interleaved: create, operator, create, ..., create. This machine's speed drifts by tens of
    # percent within minutes; each operator run sits between two plain creates, medians are reported.
    creates = [time_plain_create(k, state, f"bench-create-{stamp}-0", manifest, plane_meter)]
    runs: list[OperatorRun] = []
    # The stack's logs outlive the bench's control plane: the last run's stay for a look.
    workdir = state_dir.parent / "bench-operator-last"
    for i in range(OPERATOR_RUNS):
        runs.append(time_operator_run(k, state, f"bench-operator-{stamp}-{i}", manifest, module_cm, workdir))
        creates.append(time_plain_create(k, state, f"bench-create-{stamp}-{i + 1}", manifest, plane_meter))
    create_s = statistics.median(took for took, _, _ in creates)
    ready = [r.ready_s for r in runs]
    assert all(r is not None for r in ready)  # without ready_after_placed_s every run ends all Ready
    run = sorted(runs, key=lambda r: r.ready_s or 0.0)[len(runs) // 2]  # the median run, for its details
    ready_s = run.ready_s or 0.0
    placed_s = statistics.median(r.placed_s for r in runs)
    pair_ratios = [
        (r.ready_s or 0.0) / statistics.mean([creates[i][0], creates[i + 1][0]]) for i, r in enumerate(runs)
    ]
    _, baseline_cpu, baseline_requests = min(creates, key=lambda c: c[0])
    cpu_ms = {name: round(1000 * spent / N, 1) for name, spent in run.cpu_s.items() if spent > 0.05}
    shards_ms = sum(v for name, v in cpu_ms.items() if name.startswith("tensorwasm-shard"))
    request_rows = "\n".join(
        f"| {kind} | {baseline_requests.get(kind, 0) / N:.2f} | {count / N:.2f} |"
        for kind, count in run.requests.most_common()
        if count >= N / 10
    )
    cpu_rows = "\n".join(
        f"| {name} | {1000 * baseline_cpu.get(name, 0.0) / N:.1f} | {ms:.1f} |"
        for name, ms in sorted(cpu_ms.items(), key=lambda item: -item[1])
    )
    rss_kib, writes = max(r.rss_kib for r in runs), run.writes
    applied_s = run.applied_s
    return {
        "title": f"Operator: {N} Tenants applied at once until all Placed and Ready (2 CPU shards)",
        "figures": {
            f"create_{N}_s": round(create_s, 2),
            f"create_{N}_s_min": round(min(took for took, _, _ in creates), 2),
            f"create_{N}_s_max": round(max(took for took, _, _ in creates), 2),
            "apply_with_operator_s": round(applied_s, 2),
            "all_placed_s": round(placed_s, 2),
            "placed_over_create": round(placed_s / create_s, 2),
            "all_ready_s": round(ready_s, 2),
            "ready_over_create": round(ready_s / create_s, 2),
            "ready_over_create_per_run_min": round(min(pair_ratios), 2),
            "ready_over_create_per_run_max": round(max(pair_ratios), 2),
            "operator_peak_rss_mib": round(rss_kib / 1024, 1),
            "cpu_ms_per_tenant": round(sum(cpu_ms.values()), 1),
            # The CPU every process spent in the median run spread over all cores: no schedule on this
            # machine finishes sooner. all_ready_s close to it means the run is CPU-bound.
            "cpu_floor_s": round(sum(run.cpu_s.values()) / (os.cpu_count() or 1), 2),
            "cpu_ms_per_tenant_plain_create": round(1000 * sum(baseline_cpu.values()) / N, 1),
            "operator_cpu_ms_per_tenant": cpu_ms.get("operator", 0.0),
            "shards_cpu_ms_per_tenant": round(shards_ms, 1),
        },
        "table": "CPU milliseconds per tenant, by process: the fastest plain create vs the median operator "
        "run (apply start to all Ready)\n\n| process | plain create | with operator |\n|---|---|---|\n"
        + cpu_rows
        + "\n\nAPI requests per tenant in the same windows (kinds of at least 0.1 per tenant)\n\n"
        "| request | plain create | with operator |\n|---|---|---|\n" + request_rows,
        "targets": {"ready_over_create": "<= 3"},
        "notes": (
            "Local control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok) on "
            "the same machine, started empty for this benchmark and removed after it; "
            f"one `kubectl apply` of a {N}-item List. all_placed_s runs from the start of that apply until "
            "every Tenant has status.phase Placed (seen by one `kubectl get --watch`, not polled); "
            "all_ready_s until every Tenant is Ready, served by one of 2 real CPU runtime shard processes "
            f"(LocalStack). {OPERATOR_RUNS} operator runs, each in a fresh namespace with a fresh stack, "
            f"interleaved with {OPERATOR_RUNS + 1} plain creates (after one uncounted warm-up), each "
            "namespace deleted and the API server quiet again before the next step; all_ready_s is the "
            "median run, "
            f"create_{N}_s the median create, and ready_over_create_per_run_* compare each run with the "
            "mean of the creates either side of it. Operator writes (median run): "
            + writes
            + ". Phase Events are Warnings only; kopf itself writes nothing (event handlers only)."
        ),
    }


WRITE_VERBS = ("POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION")


def _operator_writes(writes: str) -> int | None:
    """Total of the operator's own write counter ("writes={'create secrets': 500, ...}")."""
    try:
        counted = ast.literal_eval(writes.removeprefix("writes="))
    except (ValueError, SyntaxError):
        return None
    return sum(int(v) for v in counted.values()) if isinstance(counted, dict) else None


def compare_operators(
    trees: dict[str, dict[str, str]], n: int, rounds: int, ready_after_placed_s: float = 120.0
) -> dict[str, Any]:
    """Operator runs of several trees (label -> extra operator environment, e.g. PYTHONPATH) on one
    control plane of this tree, `rounds` rounds alternating the order (A B, B A, ...), one plain create
    of the same List per round as the floor. The shards, the harness and the CRDs are this tree's."""
    with fresh_control_plane() as (state, state_dir):
        k = prepare(state)
        stamp = str(int(time.time()))
        module_cm, sha = _module()
        manifest = _manifest(sha, n)
        meter = CpuMeter(dict(state.pids), state.server, state.token)
        time_plain_create(k, state, f"bench-create-{stamp}-warmup", manifest, meter)
        workdir = state_dir.parent / "bench-operator-last"
        rows: list[dict[str, Any]] = []
        labels = list(trees)
        for i in range(rounds):
            took, _, _ = time_plain_create(k, state, f"bench-create-{stamp}-{i}", manifest, meter)
            rows.append({"round": i, "tree": "plain create", "placed_s": round(took, 2)})
            for label in labels if i % 2 == 0 else labels[::-1]:
                print(f"round {i}: {label} operator, {n} tenants", file=sys.stderr, flush=True)
                ns = f"bench-operator-{stamp}-{i}-{re.sub(r'[^a-z0-9]', '', label.lower())}"
                r = time_operator_run(
                    k, state, ns, manifest, module_cm, workdir, n, trees[label], ready_after_placed_s
                )
                writes = sum(c for kind, c in r.requests.items() if kind.split(" ")[0] in WRITE_VERBS)
                rows.append({
                    "round": i,
                    "tree": label,
                    "placed_s": round(r.placed_s, 2),
                    "ready_s": None if r.ready_s is None else round(r.ready_s, 2),
                    "operator_cpu_s": round(r.cpu_s.get("operator", 0.0), 2),
                    "apiserver_cpu_s": round(r.cpu_s.get("kube-apiserver", 0.0), 2),
                    "operator_writes": _operator_writes(r.writes),
                    "api_writes_per_tenant": round(writes / n, 2),
                    "api_requests_per_tenant": round(sum(r.requests.values()) / n, 2),
                    "rss_mib": round(r.rss_kib / 1024, 1),
                    "writes": r.writes,
                    "requests": {kind: c for kind, c in r.requests.most_common() if c >= n / 10},
                })  # fmt: skip
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        return {"rows": rows, "n": n, "rounds": rounds}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
