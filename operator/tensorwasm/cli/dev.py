"""`tensorwasm dev cluster up|down|status|kubeconfig|import-image`: the local control plane (and its
real node) for development and tests.

Must not import kopf or the runtime; the work is in tensorwasm.dev.cluster.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from tensorwasm.cli import dev_autoscaler, dev_prometheus


def register(subparsers: Any) -> None:
    dev = subparsers.add_parser("dev", help="development tools (local control plane)")
    dev_sub = dev.add_subparsers(dest="dev_command", metavar="TOOL", required=True)
    cluster = dev_sub.add_parser(
        "cluster",
        help="a real local control plane on 127.0.0.1 (etcd, apiserver, controllers, scheduler, kwok) "
        "and one real node (containerd, kubelet, kube-proxy)",
    )
    cluster.add_argument("action", choices=("up", "down", "status", "kubeconfig", "import-image", "restart"))
    cluster.add_argument(
        "target",
        nargs="?",
        help="import-image: an OCI or docker image archive; restart: containerd, kubelet or kube-proxy",
    )
    cluster.add_argument(
        "--dir", type=Path, default=None, help="state directory (default ~/.cache/tensorwasm/dev-cluster)"
    )
    cluster.add_argument("--nodes", type=int, default=2, help="fake kwok nodes to create (default 2)")
    cluster.add_argument("--gpus-per-node", type=int, default=1, help="nvidia.com/gpu per fake node")
    cluster.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    cluster.add_argument(
        "--no-real-node",
        dest="real_node",
        action="store_false",
        help="only kwok nodes: no containerd/kubelet/kube-proxy (no root or network namespaces needed)",
    )
    cluster.set_defaults(handler=run_cluster)
    dev_prometheus.register(dev_sub)  # `dev prometheus`: its own module
    dev_autoscaler.register(dev_sub)  # `dev autoscaler`: likewise


def log(msg: str) -> None:
    """The dev tools' progress: stderr, so stdout keeps only what a script reads (URLs, exports)."""
    print(msg, file=sys.stderr)


def recorded_cluster(state_dir: Path | None) -> tuple[Any, Any]:
    """The LocalControlPlane and its recorded ClusterState, or ClusterError saying how to start one.

    The preamble every `tensorwasm dev` tool after `cluster up` shares (prometheus, autoscaler).
    """
    from tensorwasm.dev.cluster import ClusterError, LocalControlPlane

    plane = LocalControlPlane(state_dir, log=log)
    state = plane.state()
    if state is None:
        raise ClusterError(f"no cluster recorded in {plane.state_dir}: tensorwasm dev cluster up")
    return plane, state


def dev_tools_missing() -> bool:
    """True (after saying why) where tensorwasm.dev is absent: it ships with checkouts, not the wheel."""
    if importlib.util.find_spec("tensorwasm.dev") is not None:
        return False
    print(
        "tensorwasm dev: the dev cluster tools come with a source checkout (`make install`), "
        "not with the wheel or the image",
        file=sys.stderr,
    )
    return True


def run_cluster(args: argparse.Namespace) -> int:
    if dev_tools_missing():
        return 2
    from tensorwasm.dev.cluster import ClusterError, LocalControlPlane

    plane = LocalControlPlane(args.dir, log=log)
    try:
        if args.action == "up":
            if args.nodes < 1:
                raise ClusterError(f"--nodes must be at least 1, got {args.nodes}")
            state = plane.up(
                nodes=args.nodes,
                gpus_per_node=args.gpus_per_node,
                timeout_s=args.timeout,
                with_real_node=args.real_node,
            )
            print(f"export KUBECONFIG={state.kubeconfig}")
            return 0
        if args.action == "down":
            if not plane.down():
                log(f"No cluster recorded in {plane.state_dir}; nothing to stop")
            return 0
        if args.action == "restart":
            if not args.target:
                raise ClusterError("restart needs a component: containerd, kubelet or kube-proxy")
            plane.restart(args.target, timeout_s=args.timeout)
            log(f"Restarted {args.target}")
            return 0
        if args.action in ("kubeconfig", "import-image"):
            _, recorded = recorded_cluster(args.dir)
            if args.action == "kubeconfig":
                print(recorded.kubeconfig)
                return 0
            if not args.target:
                raise ClusterError(
                    "import-image needs an image archive: tensorwasm dev cluster import-image ARCHIVE"
                )
            print(plane.import_image(recorded, Path(args.target)).strip())
            return 0
        status = plane.status()
        for name, alive in status.running.items():
            print(f"{name:26} {'running' if alive else 'stopped'}")
        print(f"{'readyz':26} {'ok' if status.ready else 'not ready'} ({status.detail.splitlines()[0]})")
        return 0 if status.all_running and status.ready else 1
    except ClusterError as exc:
        log(f"error: {exc}")
        return 1
