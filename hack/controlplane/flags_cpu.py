"""What a build flag costs at run time: kube-apiserver's CPU for one fixed workload, two builds side by side.

`build.sh` compiles with `-gcflags=all=-l` outside the standard library (no inlining: about a quarter
less compile CPU). This measures what that costs the dev cluster: each build (a bin directory) starts its
own control plane (`tensorwasm dev cluster up --no-real-node`), both run at once, and the same
workload runs against each in turn, ROUNDS times (A B A B ...), so load from the rest of the machine
falls on both alike. The workload: a watch of ConfigMaps open throughout, OBJECTS ConfigMaps created
(one request each), LISTS lists of them all as JSON, then one delete of the collection; a first
round on each is not counted (start-up work). Reported per build: kube-apiserver's and etcd's
CPU-seconds (utime + stime from /proc) per round, and the median.

    .venv/bin/python hack/controlplane/flags_cpu.py BASE_BIN NEW_BIN [--objects 300 --lists 20 --rounds 3]

Needs the tensorwasm CLI (the virtualenv running it); writes the clusters' state under --dir (default
a new temp dir) and takes both clusters down at the end. Must not import tensorwasm (it drives the
CLI, as a user would).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "tensorwasm"  # the virtualenv running this script
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def configmaps(count: int, round_no: int) -> str:
    items = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"bench-{round_no}-{i}", "labels": {"bench": "flags-cpu"}},
            "data": {"payload": f"{i:08d}" * 128},  # 1 KiB each
        }
        for i in range(count)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


class Cluster:
    def __init__(self, name: str, bin_dir: Path, state_dir: Path) -> None:
        self.name, self.bin_dir, self.state_dir = name, bin_dir, state_dir

    def cli(self, *args: str) -> None:
        env = {**os.environ, "TENSORWASM_CONTROLPLANE_BIN": str(self.bin_dir)}
        cmd = [
            str(CLI),
            "dev",
            "cluster",
            "--dir",
            str(self.state_dir),
            "--no-real-node",
            "--nodes",
            "1",
            *args,
        ]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)

    def state(self) -> dict:
        return json.loads((self.state_dir / "cluster.json").read_text())

    def kubectl(self, *args: str, stdin: str | None = None) -> None:
        kubectl = Path(self.state()["bin_dir"]) / "kubectl"
        cmd = [str(kubectl), "--kubeconfig", self.state()["kubeconfig"], "-n", "default", *args]
        subprocess.run(cmd, input=stdin, text=True, check=True, stdout=subprocess.DEVNULL)

    def round(self, round_no: int, objects: int, lists: int) -> dict[str, float]:
        pids = self.state()["pids"]
        watched = {name: pids[name] for name in ("kube-apiserver", "etcd")}
        kubectl = Path(self.state()["bin_dir"]) / "kubectl"
        before = {name: cpu_seconds(pid) for name, pid in watched.items()}
        watch = subprocess.Popen(
            [
                str(kubectl),
                "--kubeconfig",
                self.state()["kubeconfig"],
                "-n",
                "default",
                "get",
                "configmaps",
                "-l",
                "bench=flags-cpu",
                "--watch",
                "-o",
                "name",
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            self.kubectl("create", "-f", "-", stdin=configmaps(objects, round_no))
            for _ in range(lists):
                self.kubectl("get", "configmaps", "-l", "bench=flags-cpu", "-o", "json")
            self.kubectl("delete", "configmaps", "-l", "bench=flags-cpu", "--wait=true")
        finally:
            watch.terminate()
            watch.wait()
        return {name: cpu_seconds(pid) - before[name] for name, pid in watched.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("base_bin", type=Path)
    parser.add_argument("new_bin", type=Path)
    parser.add_argument("--objects", type=int, default=300)
    parser.add_argument("--lists", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, help="where the two clusters' state goes (default: a new temp dir)"
    )
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="tensorwasm-flags-cpu-"))
    clusters = [Cluster("base", args.base_bin, root / "base"), Cluster("new", args.new_bin, root / "new")]
    results: dict[str, list[dict[str, float]]] = {c.name: [] for c in clusters}
    try:
        for c in clusters:
            c.cli("up")
        for c in clusters:  # a first round each, not counted: the API server's start-up work settles
            c.round(-1, args.objects, args.lists)
        for round_no in range(args.rounds):
            for c in clusters if round_no % 2 == 0 else reversed(clusters):
                t0 = time.monotonic()
                cpu = c.round(round_no, args.objects, args.lists)
                results[c.name].append(cpu)
                print(
                    f"round {round_no} {c.name}: kube-apiserver {cpu['kube-apiserver']:.2f} CPU-s, "
                    f"etcd {cpu['etcd']:.2f} CPU-s, {time.monotonic() - t0:.1f} s wall, "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    finally:
        for c in clusters:
            try:
                c.cli("down")
            except subprocess.CalledProcessError as err:
                print(f"{c.name}: down failed: {err}", file=sys.stderr)
    for name, rounds in results.items():
        for proc in ("kube-apiserver", "etcd"):
            values = [r[proc] for r in rounds]
            if values:
                print(
                    f"{name} {proc}: median {statistics.median(values):.2f} CPU-s "
                    f"({', '.join(f'{v:.2f}' for v in values)})"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
