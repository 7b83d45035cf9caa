"""`make demo`: the whole product on one machine, on real pods of a real local cluster.

Owns the demo script only: each step prints what it does and what the cluster answers. The cluster
(control plane, kwok nodes, one real node) comes from tensorwasm.dev.cluster; the chart is installed
on the real node by tensorwasm.dev.chart, exactly as a user installs it (image, `helm install`,
`kubectl apply`). Must not import the runtime in-process: the shards are pods.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shlex
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorwasm.api.group import API_VERSION
from tensorwasm.dev.chart import DevRelease, build_image
from tensorwasm.dev.cluster import REPO_ROOT, ClusterError, LocalControlPlane

NAMESPACE = "tensorwasm-demo"
MODULES = REPO_ROOT / "examples" / "modules"
SAMPLE_TENANT = REPO_ROOT / "crds" / "samples" / "tensorwasm.io_v1alpha1_tenant.yaml"


def banner(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def wait(what: str, predicate: Callable[[], bool], timeout_s: float = 120.0) -> float:
    """Seconds until `predicate` held; ClusterError after `timeout_s`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise ClusterError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.25)
    return time.monotonic() - started


class Demo:
    def __init__(self, release: DevRelease) -> None:
        self.release = release

    def kubectl(self, *args: str, input_text: str | None = None) -> str:
        print(f"$ kubectl {' '.join(args)}", flush=True)
        out = self.release.kubectl(*args, input_text=input_text)
        if out.strip():
            print(out.rstrip(), flush=True)
        return out

    def show_cluster(self) -> None:
        banner("The cluster: a real API server, controllers and scheduler; kwok nodes and one real node")
        self.kubectl("get", "nodes", "-o", "wide")

    def install(self) -> None:
        banner("Build the image from the Containerfile (no Docker) and import it into the real node")
        image = build_image()
        self.release.uninstall()  # a previous demo's release, if any
        self.release.prepare(image)
        banner(f"helm install into {NAMESPACE} (Pod Security: restricted), values for the dev cluster")
        print(f"$ helm install tensorwasm helm/tensorwasm -n {NAMESPACE} -f examples/values-dev-cluster.yaml")
        started = time.monotonic()
        self.release.install()
        print(f"  installed; the operator pod Ready {time.monotonic() - started:.1f}s after helm install")
        self.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide")

    def tenants(self) -> None:
        banner("Two Tenants: the README's sample (echo) and a counter that keeps its total in GPU memory")
        for name in ("echo", "counter"):
            wasm = (MODULES / f"{name}.wasm").read_bytes()
            self.release.apply({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": f"{name}-module", "namespace": NAMESPACE},
                "binaryData": {"module.wasm": base64.b64encode(wasm).decode()},
            })  # fmt: skip
        self.kubectl("apply", "-n", NAMESPACE, "-f", str(SAMPLE_TENANT.relative_to(REPO_ROOT)))
        counter = (MODULES / "counter.wasm").read_bytes()
        self.release.apply({
            "apiVersion": API_VERSION, "kind": "Tenant",
            "metadata": {"name": "counter", "namespace": NAMESPACE},
            "spec": {
                "module": {"configMapRef": {"name": "counter-module", "key": "module.wasm"},
                           "sha256": hashlib.sha256(counter).hexdigest()},
                "functions": ["add"],
                "limits": {"gpuMemory": "4Mi", "linearMemory": "1Mi", "timeoutMs": 1000},
            },
        })  # fmt: skip
        for name in ("alpha", "counter"):
            self.release.wait_tenant_ready(name)
        self.kubectl("get", "tenants", "-n", NAMESPACE, "-o", "wide")

    def invoke(self) -> None:
        banner("Invoke over HTTP through each tenant's Service (ClusterIP, kube-proxy) with its token")
        alpha = self.release.access("alpha")
        status, body = alpha.invoke("echo", b"hello from a real pod")
        print(f"  POST {alpha.url}/v1/functions/echo/invoke -> {status} {body!r}")
        counter = self.release.access("counter")
        for delta in (1, 2, 39):
            status, body = counter.invoke("add", struct.pack("<q", delta))
            print(f"  POST {counter.url}/v1/functions/add/invoke (+{delta}) -> {status} {_total(body)}")

    def client(self) -> None:
        """The client (issue 14): plain, async and streamed invokes, a load test, the kubectl plugin."""
        banner("The client: tensorwasm invoke reads the token from the Tenant's Secret (kubeconfig)")
        self._client("invoke", "-n", NAMESPACE, "alpha", "echo", "-d", "hello from tensorwasm invoke")
        banner("An async job: 202 with a job id, polled until it ends (it outlives the client)")
        self._client("invoke", "-n", NAMESPACE, "alpha", "echo", "--async", "-d", "hello from a job")
        self._client(
            "invoke", "-n", NAMESPACE, "alpha", "echo", "--async", "--no-wait", "-d", "not waited for"
        )
        banner("A streamed response: the guest writes chunks, the client prints each as it arrives (SSE)")
        wasm = (MODULES / "streamer.wasm").read_bytes()
        module = {"configMapRef": {"name": "streamer-module", "key": "module.wasm"},
                  "sha256": hashlib.sha256(wasm).hexdigest()}  # fmt: skip
        meta = {"name": "streamer", "namespace": NAMESPACE}
        self.release.apply(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {**meta, "name": "streamer-module"},
             "binaryData": {"module.wasm": base64.b64encode(wasm).decode()}},
            {"apiVersion": API_VERSION, "kind": "Tenant", "metadata": meta,
             "spec": {"module": module, "functions": ["chunks"],
                      "limits": {"linearMemory": "1Mi", "timeoutMs": 2000}}},
        )  # fmt: skip
        self.release.wait_tenant_ready("streamer")
        self._client("invoke", "-n", NAMESPACE, "streamer", "chunks", "--stream", "-d", "a chunk\n")
        banner("A quick load test: 400 invokes, 8 in flight, and their latency histogram")
        self._client(
            "invoke", "-n", NAMESPACE, "alpha", "echo", "-d", "x", "--repeat", "400", "--concurrency", "8"
        )
        banner("The same command as a kubectl plugin (kubectl-tensorwasm on PATH)")
        self._client(
            "tensorwasm", "invoke", "-n", NAMESPACE, "alpha", "echo", "-d", "hello from kubectl", kubectl=True
        )

    def _client(self, *args: str, kubectl: bool = False) -> None:
        exe = (
            [str(self.release.bin_dir / "kubectl")]
            if kubectl
            else [sys.executable, "-m", "tensorwasm.cli.main"]
        )
        print(f"$ {'kubectl' if kubectl else 'tensorwasm'} {shlex.join(args)}", flush=True)
        env = {**os.environ, "KUBECONFIG": self.release.state.kubeconfig}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # kubectl-tensorwasm
        done = subprocess.run([*exe, *args], env=env, capture_output=True, timeout=300, check=False)
        for stream in (done.stderr, done.stdout):  # the client's notes (job id, route) come first
            text = stream.decode(errors="replace").rstrip()
            if text:
                print("  " + text.replace("\n", "\n  "), flush=True)
        if done.returncode != 0:
            raise ClusterError(f"the client failed (exit {done.returncode})")

    def snapshot_and_restart(self) -> None:
        banner("Snapshot the counter (GPU memory into zstd chunks on the shards' volume)")
        snapshot = {"apiVersion": API_VERSION, "kind": "Snapshot",
                    "metadata": {"name": "counter-demo-1", "namespace": NAMESPACE},
                    "spec": {"tenant": "counter"}}  # fmt: skip
        self.release.apply(snapshot)
        wait("the Snapshot to be Ready", lambda: self._snapshot_phase("counter-demo-1") == "Ready", 120)
        self.kubectl("get", "snapshots", "-n", NAMESPACE)
        shard = self.release.get("tenant", "counter")["status"]["shard"]
        banner(f"Delete the shard pod {shard}: the StatefulSet brings it back and it restores the counter")
        uid = self.release.get("pod", shard)["metadata"]["uid"]
        self.kubectl("delete", "pod", shard, "-n", NAMESPACE, "--wait=false")
        took = wait(
            "the shard pod to come back Ready",
            lambda: self._pod_ready(shard, other_than=uid),
            180,
        )
        self.release.wait_tenant_ready("counter")
        print(f"  {shard} replaced and Ready in {took:.1f}s")
        self.kubectl("get", "tenants", "-n", NAMESPACE)
        counter = self.release.access("counter")
        status, body = counter.invoke("add", struct.pack("<q", 0))
        print(f"  POST {counter.url}/v1/functions/add/invoke (+0) -> {status} {_total(body)} (restored)")

    def helm_test(self) -> None:
        banner("helm test: a throwaway Tenant invoked from inside the cluster")
        print(f"$ helm test tensorwasm -n {NAMESPACE}")
        out = self.release.helm("test", "tensorwasm", "--timeout=300s")
        phases = {line.split()[-1] for line in out.splitlines() if line.startswith("Phase:")}
        print(f"  tensorwasm-selftest: {', '.join(sorted(phases))}")
        if phases != {"Succeeded"}:
            raise ClusterError(f"helm test did not pass:\n{out}")

    def planner(self) -> None:
        banner("Size hosts before buying them: tensorwasm plan")
        cmd = ["plan", "--tenants", "50", "--qps", "1000"]
        print("$ tensorwasm " + " ".join(cmd), flush=True)
        subprocess.run([sys.executable, "-m", "tensorwasm.cli.main", *cmd], check=False)

    def _snapshot_phase(self, name: str) -> str:
        status = self.release.get("snapshot", name).get("status") or {}
        if status.get("phase") == "Failed":
            raise ClusterError(f"Snapshot {name} failed: {json.dumps(status)}")
        return str(status.get("phase", ""))

    def _pod_ready(self, name: str, other_than: str) -> bool:
        try:
            pod: dict[str, Any] = self.release.get("pod", name)
        except ClusterError:
            return False
        conditions = {c["type"]: c["status"] for c in (pod.get("status") or {}).get("conditions") or []}
        return pod["metadata"]["uid"] != other_than and conditions.get("Ready") == "True"


def scaling_signal(demo: Demo) -> None:
    """The autoscaling signal as the autoscalers read it: the dev Prometheus scraping the shard pods."""
    from tensorwasm.dev import prometheus

    banner("The scaling signal: a Prometheus pod scrapes the shards as the chart's ServiceMonitor would")
    release = demo.release
    dev = prometheus.DevPrometheus(
        release.plane, release.state, "tensorwasm-monitoring", [NAMESPACE], log=lambda m: print(f"  {m}")
    )
    url = dev.up()
    ns = f'namespace="{NAMESPACE}"'
    queries = {
        # What the ScaledObject's trigger and the HPA path's rule read (targetAverageValue per shard).
        "queue depth per shard": f"sum by (pod) (tensorwasm_queue_depth{{{ns}}})",
        "saturation, worst tenant per shard (1 = next invoke gets 429)": (
            f"max by (pod) ((tensorwasm_queue_depth{{{ns}}} + tensorwasm_invocations_in_flight{{{ns}}})"
            f" / tensorwasm_tenant_queue_capacity{{{ns}}})"
        ),
        "invokes admitted through the queue": f"sum by (pod) (tensorwasm_queue_wait_seconds_count{{{ns}}})",
        # Since the shard started (Prometheus starts after the load test: a rate would have one sample).
        "mean wait for a worker (s)": (
            f"sum by (pod) (tensorwasm_queue_wait_seconds_sum{{{ns}}})"
            f" / sum by (pod) (tensorwasm_queue_wait_seconds_count{{{ns}}})"
        ),
    }
    prometheus.wait_for_series(url, f"tensorwasm_queue_wait_seconds_count{{{ns}}} > 0", timeout_s=120)
    for what, promql in queries.items():
        print(f"$ tensorwasm dev prometheus query '{promql}'")
        found = prometheus.query(url, promql)
        for series in found:
            print(f"  {what}: {series['metric'].get('pod', '')} = {float(series['value'][1]):g}")
        if not found:
            print(f"  {what}: no series yet")


def scale_out_and_in(demo: Demo) -> None:
    """Shards 1 -> 2 -> 1 under load: the shard count, the tenants that move, and every answer counted."""
    from tensorwasm.dev.scaling import ScalingRun

    banner("Scale the shards 1 -> 2 -> 1 while a client per tenant keeps counting (Retry-After honoured)")
    release = demo.release
    names = ("alpha", "counter")
    counter = {"counter": (release.access("counter").url, release.access("counter").token)}
    run = ScalingRun(release.kubectl, NAMESPACE, log=lambda m: print(f"  {m}", flush=True))
    run.start(counter, max_seconds=600)
    try:
        for replicas in (2, 1):
            print(f"$ kubectl scale statefulset tensorwasm-shard --replicas={replicas} -n {NAMESPACE}")
            step = run.scale(replicas)
            shards = sorted(run.shard_pods())
            moved = ", ".join(f"{n}: {a} -> {b}" for n, (a, b) in step.moved.items()) or "none"
            print(f"  shards now {len(shards)} ({', '.join(shards)}); moved tenants: {moved}")
            print(
                f"  new pods Ready {step.pods_ready_s or 0:.1f}s, moved tenants serving {step.serving_s:.1f}s"
            )
            demo.kubectl("get", "tenants", *names, "-n", NAMESPACE)
    finally:
        totals = run.stop()
    client = run.clients["counter"]
    print(f"  counter client: {dict(totals)}; total now {client.total}; errors: {run.errors() or 'none'}")


def _total(body: bytes) -> object:
    return struct.unpack("<q", body)[0] if len(body) == 8 else body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tensorwasm.dev.demo", description=__doc__)
    parser.add_argument("--dir", type=Path, default=None, help="cluster state directory")
    parser.add_argument("--down", action="store_true", help="stop the cluster at the end")
    args = parser.parse_args(argv)
    plane = LocalControlPlane(args.dir, log=lambda m: print(m, flush=True))
    try:
        banner("Start (or reuse) the local cluster")
        state = plane.up()
        demo = Demo(DevRelease(plane, state, NAMESPACE))
        demo.show_cluster()
        demo.install()
        demo.tenants()
        demo.invoke()
        demo.client()
        scaling_signal(demo)
        demo.snapshot_and_restart()
        scale_out_and_in(demo)
        demo.helm_test()
        demo.planner()
    except ClusterError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.down:
            plane.down()
    banner("Done")
    if not args.down:
        print(f"The cluster keeps running: export KUBECONFIG={state.kubeconfig}")
        print(f"Remove the release: helm uninstall tensorwasm -n {NAMESPACE}")
        print("Stop everything: make cluster-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
