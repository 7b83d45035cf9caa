"""`make demo`: the whole product on one machine, on a real local control plane.

Owns the demo script only: each step prints what it does and what the cluster answers.
Must not import the runtime in-process (shards run as their own processes, like pods).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tensorwasm.dev.cluster import REPO_ROOT, ClusterError, ClusterState, LocalControlPlane


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

    def wait(self, what: str, predicate: object, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if callable(predicate) and predicate():
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
        ns = "tensorwasm-demo"
        self.kubectl("create", "namespace", ns, "--dry-run=client", "-o", "json", show=False)
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
    except ClusterError as exc:
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
