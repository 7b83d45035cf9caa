"""`make demo`: the whole product on one machine, on a real local control plane.

Owns the demo script only: each step prints what it does and what the cluster answers.
Must not import the runtime in-process (shards run as their own processes, like pods).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorwasm.dev.cluster import REPO_ROOT, ClusterError, ClusterState, LocalControlPlane
from tensorwasm.dev.stack import LocalStack, StackError, error_kind, invoke

NAMESPACE = "tensorwasm-demo"
FIXTURES = REPO_ROOT / "tests" / "fixtures"


def banner(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


class Demo:
    def __init__(self, plane: LocalControlPlane, state: ClusterState) -> None:
        self.plane, self.state = plane, state

    def kubectl(self, *args: str, input_text: str | None = None, show: bool = True) -> str:
        if show:
            print(f"$ kubectl {' '.join(args)}", flush=True)
        out = self.plane.kubectl(self.state, *args, input_text=input_text)
        if show and out.strip():
            print(out.rstrip(), flush=True)
        return out

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-n", NAMESPACE, "-o", "json", show=False))

    def wait(self, what: str, predicate: Callable[[], bool], timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise ClusterError(f"timed out after {timeout_s:.0f}s waiting for {what}")

    def show_control_plane(self) -> None:
        banner("The control plane: real apiserver, controllers and scheduler; kwok runs the nodes")
        self.kubectl("version")
        self.kubectl("get", "nodes", "-o", "wide")

    def apply_crds(self) -> None:
        crds = sorted((REPO_ROOT / "crds").glob("*.yaml"))
        if not crds:
            return
        banner("Install the TensorWasm CRDs")
        args = [a for c in crds for a in ("-f", str(c))]
        self.kubectl("apply", "--server-side", "--force-conflicts", *args)
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", *args)

    def show_statefulset(self) -> None:
        banner("A StatefulSet's pods are scheduled onto the fake nodes and reach Running")
        ns = "tensorwasm-hello"
        self.kubectl("apply", "-f", "-", input_text=json.dumps(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}), show=False)  # fmt: skip
        sts = {
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "hello", "namespace": ns},
            "spec": {
                "replicas": 2, "serviceName": "hello", "selector": {"matchLabels": {"app": "hello"}},
                "template": {"metadata": {"labels": {"app": "hello"}},
                             "spec": {"containers": [{"name": "c", "image": "example.invalid/hello:0"}]}},
            },
        }  # fmt: skip
        self.kubectl("apply", "-f", "-", input_text=json.dumps(sts))

        def running() -> bool:
            pods = json.loads(self.kubectl("get", "pods", "-n", ns, "-o", "json", show=False))["items"]
            return len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods)

        self.wait("the StatefulSet's pods to run", running)
        self.kubectl("get", "pods", "-n", ns, "-o", "wide")
        self.kubectl("delete", "namespace", ns, "--wait=false", show=False)

    def run_tenants(self, workdir: Path) -> None:
        banner(f"Start the operator and two runtime shards for namespace {NAMESPACE}")
        self._remove_previous_run(workdir)
        self.kubectl("create", "namespace", NAMESPACE)
        stack = LocalStack(Path(self.state.kubeconfig), NAMESPACE, workdir, shards=2)
        try:
            stack.start()
            for proc in stack.processes.values():
                port = f" port={proc.port}" if proc.port else ""
                print(f"  {proc.name:20} pid={proc.proc.pid}{port} log={proc.log_path}")
            self._tenants_flow(stack)
        finally:
            banner("Stop the operator and the shards (the cluster keeps running)")
            # While the shards still run: they own the snapshot blobs' finalizers.
            self.kubectl("delete", "snapshots,tenants", "--all", "-n", NAMESPACE, "--timeout=60s", show=False)
            stack.stop()

    def _remove_previous_run(self, workdir: Path) -> None:
        """A previous demo's namespace, even one whose stack was killed before it could clean up."""
        exists = self.plane.kubectl(self.state, "get", "namespace", NAMESPACE, check=False)
        if not exists.strip():
            return
        # Its operator and shards are gone: nobody is left to release their finalizers.
        for kind in ("snapshots", "tenants"):
            names = self.kubectl("get", kind, "-n", NAMESPACE, "-o", "name", show=False).split()
            for name in names:
                self.kubectl("patch", name, "-n", NAMESPACE, "--type=merge",
                             "-p", '{"metadata":{"finalizers":null}}', show=False)  # fmt: skip
        self.kubectl("delete", "namespace", NAMESPACE, "--timeout=120s", show=False)
        shutil.rmtree(workdir, ignore_errors=True)

    def _tenants_flow(self, stack: LocalStack) -> None:
        banner("Tenant modules go into ConfigMaps (binaryData), pinned by sha256")
        digests = {}
        for name in ("echo", "sum"):
            wasm = _wat_to_wasm(FIXTURES / f"{name}.wat")
            digests[name] = hashlib.sha256(wasm).hexdigest()
            cm = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{name}-module", "namespace": NAMESPACE},
                  "binaryData": {"module.wasm": base64.b64encode(wasm).decode()}}  # fmt: skip
            self.kubectl("apply", "-f", "-", input_text=json.dumps(cm))
            print(f"  {name}-module: {len(wasm)} bytes, sha256 {digests[name]}")

        banner("Apply three Tenants; the operator places them on the shards, the shards load them")
        tenants = [
            ("alpha", "echo", ["echo"], "256Mi"),
            ("beta", "sum", ["sum"], "128Mi"),
            ("gamma", "echo", ["echo"], "64Mi"),
        ]
        for name, module, functions, gpu in tenants:
            self.kubectl("apply", "-f", "-", input_text=json.dumps(_tenant(name, module, digests[module],
                                                                              functions, gpu)))  # fmt: skip

        def all_ready() -> bool:
            stack.check_alive()
            items = self.get_json("tenants")["items"]
            return len(items) == 3 and all(t.get("status", {}).get("phase") == "Ready" for t in items)

        self.wait("all three Tenants to be Ready", all_ready, timeout_s=120)
        self.kubectl("get", "tenants", "-n", NAMESPACE)
        self.kubectl("get", "statefulsets,services,pods", "-n", NAMESPACE)

        banner("Invoke functions over HTTP with each tenant's bearer token (from its Secret)")
        alpha = self._tenant_access("alpha", stack)
        beta = self._tenant_access("beta", stack)
        status, body = invoke(alpha[0], alpha[1], "echo", b"hello from tensorwasm")
        print(f"  POST /v1/functions/echo/invoke (alpha) -> {status} {body!r}")
        numbers = struct.pack("<4i", 1, 2, 3, 36)
        status, body = invoke(beta[0], beta[1], "sum", numbers)
        total = struct.unpack("<q", body)[0] if status == 200 else body.decode(errors="replace")
        print(f"  POST /v1/functions/sum/invoke (beta, [1, 2, 3, 36]) -> {status} {total}")
        status, body = invoke(beta[0], alpha[1], "sum", numbers, tenant="beta")
        refused = f"{status} {error_kind(body)}"
        print(f"  POST /v1/tenants/beta/functions/sum/invoke with alpha's token -> {refused}")

        banner("Snapshot alpha: the owning shard captures its wasm and GPU memory into zstd chunks")
        snap = {
            "apiVersion": "tensorwasm.io/v1alpha1",
            "kind": "Snapshot",
            "metadata": {"name": "alpha-demo-1", "namespace": NAMESPACE},
            "spec": {"tenant": "alpha"},
        }
        self.kubectl("apply", "-f", "-", input_text=json.dumps(snap))

        def snapshot_ready() -> bool:
            phase = self.get_json("snapshot", "alpha-demo-1").get("status", {}).get("phase")
            if phase == "Failed":
                raise ClusterError(
                    "the snapshot failed: " + json.dumps(self.get_json("snapshot", "alpha-demo-1"))
                )
            return bool(phase == "Ready")

        self.wait("the Snapshot to be Ready", snapshot_ready, timeout_s=60)
        self.kubectl("get", "snapshots", "-n", NAMESPACE)
        location = self.get_json("snapshot", "alpha-demo-1")["status"].get("location", "")
        if location:
            blob = Path(location.removeprefix("file://"))
            if not blob.is_absolute():
                blob = stack.snapshot_dir / blob
            print(f"$ tensorwasm snapshot inspect {blob}")
            subprocess.run([sys.executable, "-m", "tensorwasm.cli.main", "snapshot", "inspect", str(blob)],
                           check=False)  # fmt: skip

    def _tenant_access(self, tenant: str, stack: LocalStack) -> tuple[int, str]:
        obj = self.get_json("tenant", tenant)
        secret = obj["spec"].get("authSecretRef", {}).get("name") or f"tw-{tenant}-token"
        token = base64.b64decode(self.get_json("secret", secret)["data"]["token"]).decode()
        return stack.shard_port(obj["status"]["shard"]), token

    def show_planner(self) -> None:
        banner("Size hosts before buying them: tensorwasm plan")
        cmd = ["plan", "--tenants", "50", "--qps", "1000"]
        print("$ tensorwasm " + " ".join(cmd), flush=True)
        subprocess.run([sys.executable, "-m", "tensorwasm.cli.main", *cmd], check=False)


def _wat_to_wasm(path: Path) -> bytes:
    import wasmtime  # the demo ships modules as real binaries, as a user would

    return bytes(wasmtime.wat2wasm(path.read_text()))


def _tenant(name: str, module: str, sha256: str, functions: list[str], gpu: str) -> dict[str, Any]:
    return {
        "apiVersion": "tensorwasm.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "module": {"configMapRef": {"name": f"{module}-module", "key": "module.wasm"}, "sha256": sha256},
            "functions": functions,
            "limits": {"gpuMemory": gpu, "linearMemory": "16Mi", "timeoutMs": 1000, "maxConcurrency": 2},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tensorwasm.dev.demo", description=__doc__)
    parser.add_argument("--dir", type=Path, default=None, help="cluster state directory")
    parser.add_argument("--down", action="store_true", help="stop the cluster at the end")
    args = parser.parse_args(argv)
    plane = LocalControlPlane(args.dir, log=lambda m: print(m, flush=True))
    try:
        banner("Start (or reuse) the local control plane")
        state = plane.up()
        demo = Demo(plane, state)
        demo.show_control_plane()
        demo.apply_crds()
        demo.show_statefulset()
        demo.run_tenants(plane.state_dir / "demo-stack")
        demo.show_planner()
    except (ClusterError, StackError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.down:
            plane.down()
    banner("Done")
    if not args.down:
        print(f"The cluster keeps running: export KUBECONFIG={state.kubeconfig}")
        print("Stop it with: make cluster-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
