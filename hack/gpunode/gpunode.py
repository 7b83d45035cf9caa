"""The GPU node (issue 19) on the GPU machine: bring it up, install the chart with MPS and GPU shards,
check what the issue asks and measure it. Runs there after `node-host.sh unpack` (see plan.sh).

  python3 hack/gpunode/gpunode.py all      # up + chart + checks + measurements, results in $OUT
  python3 hack/gpunode/gpunode.py up       # only the node (cluster state in /var/tmp/tw-gpunode/cluster)

The node is the dev cluster's real node (tensorwasm.dev.cluster / .node: etcd, kube-apiserver,
controller-manager, scheduler; containerd, runc, kubelet, kube-proxy in a network namespace) with the
binaries unpacked in /opt/tw-gpunode, plus what makes it a GPU node the Kubernetes way:
- a CDI spec (/var/run/cdi/tensorwasm-gpu.json, kind tensorwasm.io/gpu): one device per /dev/nvidiaN
  and `all`, each with the control/UVM device nodes, the read-only driver folder /usr/local/nvidia,
  the MPS binaries and LD_LIBRARY_PATH to the driver's libcuda;
- a device plugin (hack/gpunode/deviceplugin) advertising nvidia.com/gpu (-replicas per GPU, so shards
  can share a GPU through MPS) and answering Allocate with those CDI names: containerd applies them;
- a runc wrapper (nvidia_runc.py) doing what the NVIDIA container runtime does for
  NVIDIA_VISIBLE_DEVICES=all, which the chart's MPS DaemonSet sets (it requests no GPU);
- the labels GPU nodes carry (nvidia.com/gpu.present=true).
The chart is installed unchanged with examples/values-gpu-node.yaml. Standard library only (plus the
repository's source roots); every figure is written to $OUT/gpunode.json as it is measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ROOTS = [str(REPO / root) for root in ("bench", "runtime", "operator", "api", "dev")]
sys.path[:0] = ROOTS
# Runtime processes this starts (process-mode figures) import the same source roots.
os.environ["PYTHONPATH"] = ":".join([*ROOTS, *filter(None, [os.environ.get("PYTHONPATH")])])

from tensorwasm.dev import chart as dev_chart  # noqa: E402
from tensorwasm.dev import node as real_node  # noqa: E402
from tensorwasm.dev.chart import (  # noqa: E402
    DevRelease,
    build_local_storage_class,
    build_local_volume,
)
from tensorwasm.dev.cluster import ClusterState, LocalControlPlane  # noqa: E402

ROOT = Path(os.environ.get("TW_GPUNODE_ROOT", "/opt/tw-gpunode"))
STATE_DIR = Path(os.environ.get("TW_GPUNODE_STATE", "/var/tmp/tw-gpunode/cluster"))
OUT = Path(os.environ.get("OUT", "/var/tmp/tw-gpunode/out"))
CDI_SPEC = Path("/var/run/cdi/tensorwasm-gpu.json")
CDI_KIND = "tensorwasm.io/gpu"
DRIVER_DIR = Path("/usr/local/nvidia")
MPS_BINARIES = ("nvidia-cuda-mps-control", "nvidia-cuda-mps-server", "nvidia-smi")
NAMESPACE = "tensorwasm"
VALUES = REPO / "examples" / "values-gpu-node.yaml"
REPLICAS_PER_GPU = int(os.environ.get("TW_GPUNODE_REPLICAS", "4"))
API = "tensorwasm.io/v1alpha1"

real_node.RUNC = str(ROOT / "bin" / "nvidia-runc")
if (ROOT / "chart").is_dir():  # the chart the carried image was built with (pack.sh)
    dev_chart.CHART = ROOT / "chart"
real_node.CNI_BIN_DIR = str(ROOT / "root" / "usr" / "lib" / "cni")

RESULTS: dict[str, Any] = {}


def log(msg: str) -> None:
    print(f"[gpunode {time.strftime('%H:%M:%S', time.gmtime())}] {msg}", flush=True)


def record(key: str, value: Any) -> None:
    RESULTS[key] = value
    log(f"{key} = {json.dumps(value)[:400]}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpunode.json").write_text(json.dumps(RESULTS, indent=2))


def sh(*argv: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=timeout)


# ----- the GPU half of the node ------------------------------------------------------------------


def build_cdi_spec() -> dict[str, Any]:
    """CDI spec for every /dev/nvidiaN: the device node per device, the shared nodes, the driver."""
    gpus = sorted(p.name.removeprefix("nvidia") for p in Path("/dev").glob("nvidia[0-9]*"))
    shared = [
        f"/dev/{n}" for n in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools") if Path(f"/dev/{n}").exists()
    ]
    shared += sorted(str(p) for p in Path("/dev/nvidia-caps").glob("*") if p.is_char_device())
    libcuda = sorted(DRIVER_DIR.rglob("libcuda.so.1"))
    if not libcuda:
        raise SystemExit(f"no libcuda.so.1 under {DRIVER_DIR}")
    mounts = [{"hostPath": str(DRIVER_DIR), "containerPath": str(DRIVER_DIR),
               "options": ["ro", "nosuid", "nodev", "rbind"]}]  # fmt: skip
    for name in MPS_BINARIES:  # into the image's PATH (the chart's daemon runs nvidia-cuda-mps-control)
        found = shutil.which(name) or next((str(p) for p in DRIVER_DIR.rglob(name)), None)
        if found:
            mounts.append({"hostPath": os.path.realpath(found), "containerPath": f"/usr/local/bin/{name}",
                           "options": ["ro", "nosuid", "nodev", "bind"]})  # fmt: skip
    devices = [{"name": g, "containerEdits": {"deviceNodes": [{"path": f"/dev/nvidia{g}"}]}} for g in gpus]
    devices.append(
        {"name": "all", "containerEdits": {"deviceNodes": [{"path": f"/dev/nvidia{g}"} for g in gpus]}}
    )
    return {
        "cdiVersion": "0.6.0",
        "kind": CDI_KIND,
        "devices": devices,
        "containerEdits": {
            "deviceNodes": [{"path": p} for p in shared],
            "mounts": mounts,
            "env": [f"LD_LIBRARY_PATH={libcuda[0].parent}"],
        },
    }


def install_gpu_host() -> None:
    spec = build_cdi_spec()
    CDI_SPEC.parent.mkdir(parents=True, exist_ok=True)
    CDI_SPEC.write_text(json.dumps(spec, indent=2))
    record("cdi_spec", spec)
    wrapper = ROOT / "bin" / "nvidia-runc"
    source = (REPO / "hack" / "gpunode" / "nvidia_runc.py").read_text()
    wrapper.write_text(f"#!{os.path.realpath(sys.executable)} -S\n{source}")
    wrapper.chmod(0o755)


class GpuControlPlane(LocalControlPlane):
    """The dev control plane without kwok and fake nodes: the GPU node is the only node."""

    def _spawn(self, state: ClusterState, name: str, argv: Any, cgroup_procs: Any = ()) -> None:
        if name != "kwok":
            super()._spawn(state, name, argv, cgroup_procs)

    def kubectl(
        self, state: ClusterState, *args: str, input_text: str | None = None, check: bool = True
    ) -> str:
        if args[:3] == ("apply", "-f", "-") and not input_text:
            return ""  # the fake nodes' manifest, empty here
        return super().kubectl(state, *args, input_text=input_text, check=check)


def start_plugin(state: ClusterState) -> int:
    log_path = STATE_DIR / "device-plugin.log"
    with open(log_path, "ab") as f:
        proc = subprocess.Popen(
            [str(ROOT / "bin" / "tensorwasm-gpu-plugin"), f"-replicas={REPLICAS_PER_GPU}", f"-cdi-kind={CDI_KIND}"],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return proc.pid


def down() -> None:
    """Stop what an earlier run started here (the plugin, then the cluster and its node)."""
    pid_file = STATE_DIR / "device-plugin.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    GpuControlPlane(STATE_DIR, log=log).down()


def up() -> tuple[GpuControlPlane, ClusterState]:
    os.environ["TENSORWASM_CONTROLPLANE_BIN"] = str(ROOT / "bin")
    os.environ["PATH"] = f"{ROOT / 'wrap'}:{ROOT / 'bin'}:{os.environ['PATH']}"
    install_gpu_host()
    down()
    plane = GpuControlPlane(STATE_DIR, log=log)
    t0 = time.monotonic()
    state = plane.up(nodes=0, timeout_s=300)
    record("node_ready_s", round(time.monotonic() - t0, 1))
    node = real_node.NODE_NAME
    plane.kubectl(state, "label", "node", node, "nvidia.com/gpu.present=true", "--overwrite")
    pid = start_plugin(state)
    (STATE_DIR / "device-plugin.pid").write_text(str(pid))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        alloc = plane.kubectl(state, "get", "node", node, "-o", "jsonpath={.status.allocatable}", check=False)
        if '"nvidia.com/gpu"' in alloc:
            record("node_allocatable", json.loads(alloc))
            break
        time.sleep(0.5)
    else:
        raise SystemExit("the kubelet never advertised nvidia.com/gpu; see device-plugin.log")
    t0 = time.monotonic()
    plane.import_image(state, ROOT / "images" / "tensorwasm.oci.tar")
    record("image_import_s", round(time.monotonic() - t0, 1))
    return plane, state


# ----- the chart ---------------------------------------------------------------------------------


def wait_for(what: str, fn: Any, timeout_s: float = 300, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = fn()
        except Exception:  # noqa: BLE001 - retried until the deadline, the last error reported
            value = None
            if time.monotonic() > deadline:
                raise
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every)


def get(rel: DevRelease, kind: str, name: str) -> dict[str, Any]:
    out = rel.kubectl("get", kind, name, "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(out) if out.strip() else {}


def pods(rel: DevRelease, component: str) -> list[dict[str, Any]]:
    out = rel.kubectl(
        "get", "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/component={component}", "-o", "json"
    )
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def pod_ready(pod: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in (pod.get("status") or {}).get("conditions") or []}
    return conds.get("Ready") == "True"


def install_chart(plane: GpuControlPlane, state: ClusterState) -> DevRelease:
    rel = DevRelease(plane, state, NAMESPACE, log=log)
    # MPS needs host IPC and the pipe hostPath: the privileged Pod Security level (docs/helm.md).
    rel.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        build_local_storage_class(),
    )
    rel.volume_dir.mkdir(parents=True, exist_ok=True)
    os.chown(rel.volume_dir, 65532, 65532)
    rel.apply(build_local_volume(NAMESPACE, rel.snapshot_claim, rel.volume_dir))
    t0 = time.monotonic()
    rel.install(values=(VALUES,), timeout_s=300)
    record("helm_install_to_ready_s", round(time.monotonic() - t0, 1))
    return rel


def configmap(rel: DevRelease, name: str, wasm: Path) -> None:
    rel.kubectl("create", "configmap", name, "-n", NAMESPACE, f"--from-file=module.wasm={wasm}")


def tenant(
    name: str, module: str, wasm: Path, functions: list[str], gpu_memory: str, **limits: Any
) -> dict[str, Any]:
    import hashlib

    return {
        "apiVersion": API, "kind": "Tenant", "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "module": {"configMapRef": {"name": module, "key": "module.wasm"},
                       "sha256": hashlib.sha256(wasm.read_bytes()).hexdigest()},
            "functions": functions,
            "limits": {"gpuMemory": gpu_memory, "linearMemory": "4Mi", "timeoutMs": 5000,
                       "maxConcurrency": 1, "queueLength": 256, **limits},
        },
    }  # fmt: skip


class Target:
    """Where one tenant is served: its shard pod's address (and the Service's), its token."""

    def __init__(self, rel: DevRelease, name: str) -> None:
        obj = rel.wait_tenant_ready(name, timeout_s=240)
        self.name, self.shard = name, obj["status"]["shard"]
        pod = get(rel, "pod", self.shard)
        self.pod_ip = pod["status"]["podIP"]
        access = rel.access(name)
        self.token, self.service_url = access.token, access.url

    def request(self, function: str, body: bytes = b"") -> bytes:
        return (
            f"POST /v1/functions/{function}/invoke HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {self.token}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body


def http(host: str, port: int, req: bytes, timeout: float = 30) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(req.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1))
        data = b""
        while chunk := s.recv(1 << 20):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head[9:12]), body


def serial_p50(
    host: str, port: int, reqs: dict[str, bytes], rounds: int = 6, per: int = 300
) -> dict[str, float]:
    """P50/P99 us of each request over one keep-alive connection, blocks interleaved."""
    from bench_gpu_http import Conn, pct

    conn = Conn.__new__(Conn)
    conn.sock = socket.create_connection((host, port))
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.buf = bytearray()
    times: dict[str, list[float]] = {k: [] for k in reqs}
    for name, req in reqs.items():  # warm
        for _ in range(50):
            assert conn.call(req) == 200, name
    for _ in range(rounds):
        for name, req in reqs.items():
            for _ in range(per):
                t0 = time.perf_counter()
                status = conn.call(req)
                times[name].append(time.perf_counter() - t0)
                assert status == 200, f"{name} answered {status}"
    conn.sock.close()
    out = {}
    for name, t in times.items():
        out[f"{name}_p50_us"] = round(pct(t, 0.5), 1)
        out[f"{name}_p99_us"] = round(pct(t, 0.99), 1)
    return out


def closed_loop(targets: list[tuple[str, int, bytes]], connections: int, duration: float) -> dict[str, Any]:
    """Closed loop over `targets` from generator processes (this file's `load`), merged."""
    from bench_gpu_http import pct

    per_proc = max(1, connections // 4)
    procs = []
    for k in range(4):
        spec = {"targets": [[h, p, r.decode("latin-1")] for h, p, r in targets], "connections": per_proc,
                "duration": duration, "offset": k}  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "load", json.dumps(spec)], stdout=subprocess.PIPE, text=True
            )
        )
    lat: list[float] = []
    errors = 0
    for p in procs:
        out, _ = p.communicate(timeout=duration + 120)
        part = json.loads(out)
        lat += part["lat"]
        errors += part["errors"]
    return {"rps": round(len(lat) / duration, 1), "p50_us": round(pct(lat, 0.5), 1),
            "p99_us": round(pct(lat, 0.99), 1), "errors": errors, "connections": per_proc * 4}  # fmt: skip


def load_main(spec: dict[str, Any]) -> None:
    from bench_gpu_http import Conn

    targets = [(h, p, r.encode("latin-1")) for h, p, r in spec["targets"]]
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + spec["duration"]
    lock = threading.Lock()

    def worker(k: int) -> None:
        nonlocal errors
        i = k + spec["offset"]
        conns: dict[tuple[str, int], Any] = {}
        mine: list[float] = []
        bad = 0
        while time.perf_counter() < stop:
            host, port, req = targets[i % len(targets)]
            conn = conns.get((host, port))
            if conn is None:
                conn = Conn.__new__(Conn)
                try:
                    conn.sock = socket.create_connection((host, port), timeout=5)
                except OSError:
                    bad += 1
                    i += spec["connections"]
                    continue
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.buf = bytearray()
                conns[(host, port)] = conn
            t0 = time.perf_counter()
            try:
                status = conn.call(req)
            except OSError:
                conns.pop((host, port), None)
                bad += 1
                i += spec["connections"]
                continue
            if status == 200:
                mine.append(time.perf_counter() - t0)
            else:
                bad += 1
            i += spec["connections"]
        with lock:
            lat.extend(mine)
            errors += bad

    ths = [threading.Thread(target=worker, args=(k,)) for k in range(spec["connections"])]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    json.dump({"lat": lat, "errors": errors}, sys.stdout)


def exec_in(rel: DevRelease, pod: str, *argv: str, container: str | None = None) -> tuple[int, str]:
    args = ["exec", "-n", NAMESPACE, pod, *(["-c", container] if container else []), "--", *argv]
    proc = subprocess.run(
        [str(Path(rel.state.bin_dir) / "kubectl"), f"--kubeconfig={rel.state.kubeconfig}", *args],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    return proc.returncode, (proc.stdout + proc.stderr).strip()


# What a shard pod's own Python shows about the cap layers under MPS (run with kubectl exec).
CAPS_PROBE = r"""
import json, os
os.environ.setdefault("CUDA_MPS_PIPE_DIRECTORY", os.environ.get("TENSORWASM_RUNTIME_MPS_PIPE_DIR", ""))
from cuda.bindings import driver as cu
out = {"pinned_limit": os.environ.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"),
       "threads": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")}
cu.cuInit(0)
err, dev = cu.cuDeviceGet(0)
err, ctx = cu.cuDevicePrimaryCtxRetain(dev)
cu.cuCtxSetCurrent(ctx)
err, name = cu.cuDeviceGetName(64, dev)
out["device"] = name.split(b"\0")[0].decode()
limit_mib = int(out["pinned_limit"].split("=")[1].rstrip("M")) if out["pinned_limit"] else 0
for mib in (limit_mib // 2, limit_mib + 1024):
    err, ptr = cu.cuMemAlloc(mib << 20)
    out[f"cuMemAlloc_{mib}MiB"] = err.name
    if not err:
        cu.cuMemFree(ptr)
print(json.dumps(out), flush=True)
props = cu.CUmemPoolProps()
props.allocType = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
props.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
props.location.id = 0
props.maxSize = 64 << 20
err, pool = cu.cuMemPoolCreate(props)
err, stream = cu.cuStreamCreate(0)
err, p = cu.cuMemAllocFromPoolAsync(65 << 20, pool, stream)
out["pool_65MiB_in_64MiB_pool"] = err.name
print(json.dumps(out))
"""


def checks(rel: DevRelease) -> None:
    wasm = ROOT / "wasm"
    mps_pods = pods(rel, "mps")
    shard_pods = pods(rel, "runtime-shard")
    record("pods", {p["metadata"]["name"]: {"node": p["spec"].get("nodeName"), "ip": p["status"].get("podIP"),
                                            "ready": pod_ready(p)} for p in mps_pods + shard_pods})  # fmt: skip
    if mps_pods:
        name = mps_pods[0]["metadata"]["name"]
        record("mps_daemon_log", rel.kubectl("logs", "-n", NAMESPACE, name, check=False)[-2000:])
    for p in shard_pods:
        env = {e["name"]: e.get("value") for e in p["spec"]["containers"][0].get("env", [])}
        record(f"shard_env_{p['metadata']['name']}", {k: v for k, v in env.items() if "MPS" in k})
        limits = p["spec"]["containers"][0]["resources"].get("limits", {})
        record(f"shard_limits_{p['metadata']['name']}", limits)
        try:  # which backend the shard runs: auto falls back to the CPU when CUDA cannot start
            with urllib.request.urlopen(f"http://{p['status']['podIP']}:9090/metrics", timeout=10) as r:
                info = [
                    ln
                    for ln in r.read().decode().splitlines()
                    if ln.startswith("tensorwasm_accelerator_info")
                ]
            record(f"shard_accelerator_{p['metadata']['name']}", info)
            with urllib.request.urlopen(f"http://{p['status']['podIP']}:9090/readyz", timeout=10) as r:
                record(f"shard_readyz_{p['metadata']['name']}", json.loads(r.read()).get("accelerator"))
        except Exception as exc:  # noqa: BLE001
            record(f"shard_readyz_{p['metadata']['name']}", repr(exc))

    # A tenant's CUDA kernel over HTTP: vector_add on the H200.
    configmap(rel, "vector-add", wasm / "vector_add.wasm")
    rel.apply(
        # Each GPU allocation is charged in whole 2 MiB pages: a, b and out need 6 MiB.
        tenant(
            "vadd",
            "vector-add",
            wasm / "vector_add.wasm",
            ["vector_add"],
            "8Mi",
            maxBodyBytes="16Mi",
            linearMemory="64Mi",
        )
    )
    t = Target(rel, "vadd")
    n = 1000
    a = [float(i) for i in range(n)]
    b = [0.5 * i for i in range(n)]
    body = struct.pack("<I", n) + struct.pack(f"<{n}f", *a) + struct.pack(f"<{n}f", *b)
    status, out = http(t.pod_ip, 8080, t.request("vector_add", body))
    got = struct.unpack(f"<{n}f", out) if status == 200 and len(out) == 4 * n else None
    record("vector_add_over_http", {"status": status, "shard": t.shard, "body": out[:300].decode(errors="replace") if status != 200 else "",
                                    "correct": got is not None and all(abs(g - 1.5 * i) < 1e-3 for i, g in enumerate(got))})  # fmt: skip
    try:
        svc_host, svc_port = t.service_url.removeprefix("http://").split(":")
        status_svc, _ = http(svc_host, int(svc_port), t.request("vector_add", body), timeout=10)
        record("vector_add_through_service", status_svc)
    except Exception as exc:  # noqa: BLE001 - no iptables here: say so and go on
        record("vector_add_through_service", repr(exc))
    # Over the tenant's 8 MiB cap: three 4 MiB buffers.
    n = 1 << 20
    big = struct.pack("<I", n) + bytes(8 * n)
    status, out = http(t.pod_ip, 8080, t.request("vector_add", big))
    record("over_cap_refused", {"status": status, "body": out[:300].decode(errors="replace")})
    # The cap layers inside a shard pod, under MPS.
    code, text = exec_in(rel, t.shard, "python", "-c", CAPS_PROBE)
    record("caps_probe_in_shard_pod", {"rc": code, "out": text[-1500:]})
    if mps_pods:
        code, text = exec_in(
            rel, mps_pods[0]["metadata"]["name"], "sh", "-c", "echo get_server_list | nvidia-cuda-mps-control"
        )
        record("mps_server_list", {"rc": code, "out": text})


def snapshot_across_restart(rel: DevRelease) -> None:
    wasm = ROOT / "wasm"
    configmap(rel, "counter", wasm / "counter.wasm")
    rel.apply(tenant("counter", "counter", wasm / "counter.wasm", ["add"], "4Mi"))
    t = Target(rel, "counter")
    totals = [http(t.pod_ip, 8080, t.request("add", struct.pack("<q", d)))[1] for d in (1, 2, 39)]
    record(
        "counter_before",
        [struct.unpack("<q", x)[0] if len(x) == 8 else x.decode(errors="replace") for x in totals],
    )
    rel.apply({"apiVersion": API, "kind": "Snapshot", "metadata": {"name": "counter-1", "namespace": NAMESPACE},
               "spec": {"tenant": "counter"}})  # fmt: skip
    snap = wait_for(
        "the Snapshot Ready",
        lambda: (
            (get(rel, "snapshot", "counter-1").get("status") or {}).get("phase") == "Ready"
            and get(rel, "snapshot", "counter-1")
        ),
        180,
    )
    record("snapshot_status", {k: v for k, v in snap["status"].items() if k != "conditions"})
    old_uid = get(rel, "pod", t.shard)["metadata"]["uid"]
    t0 = time.monotonic()
    rel.kubectl("delete", "pod", t.shard, "-n", NAMESPACE, "--wait=false")

    def replaced() -> dict[str, Any] | None:
        pod = get(rel, "pod", t.shard)
        return pod if pod and pod["metadata"]["uid"] != old_uid and pod_ready(pod) else None

    pod = wait_for("the shard pod back Ready", replaced, 300, every=0.2)
    ready_s = time.monotonic() - t0
    rel.wait_tenant_ready("counter", timeout_s=240)
    serving_s = time.monotonic() - t0
    conds = {c["type"]: c["lastTransitionTime"] for c in pod["status"]["conditions"]}
    record("gpu_shard_pod_replaced", {"delete_to_ready_s": round(ready_s, 1), "delete_to_tenant_ready_s": round(serving_s, 1),
                                      "created": pod["metadata"]["creationTimestamp"], "ready_at": conds.get("Ready")})  # fmt: skip
    t2 = Target(rel, "counter")
    status, out = http(t2.pod_ip, 8080, t2.request("add", struct.pack("<q", 0)))
    record(
        "counter_after_restart",
        {
            "status": status,
            "total": struct.unpack("<q", out)[0] if len(out) == 8 else out.decode(errors="replace"),
        },
    )


def gpu_step_tenants(rel: DevRelease, count: int) -> list[Target]:
    wasm = ROOT / "wasm"
    if not get(rel, "configmap", "gpu-step"):
        configmap(rel, "gpu-step", wasm / "gpu_step.wasm")
    rel.apply(
        *[
            tenant(f"step{i}", "gpu-step", wasm / "gpu_step.wasm", ["step", "noop"], "4Mi")
            for i in range(count)
        ]
    )
    return [Target(rel, f"step{i}") for i in range(count)]


def measure_pod_vs_process(targets: list[Target], label: str) -> None:
    t = targets[0]
    record(
        f"http_pod_{label}",
        serial_p50(t.pod_ip, 8080, {"step": t.request("step"), "noop": t.request("noop")}),
    )


def measure_process() -> None:
    """A runtime process on the host (no container, no MPS) serving the same tenant, and 16 of them
    round-robin; each with and without the queue's spin experiment (issue 16)."""
    import tempfile

    from bench_gpu_http import Runtime, token, write_tenants

    def req(fn: str, i: int) -> bytes:
        return (f"POST /v1/functions/{fn}/invoke HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {token(i)}\r\n"
                "Content-Length: 0\r\n\r\n").encode()  # fmt: skip

    for label, env in (("", {}), ("_spin300", {"TENSORWASM_RUNTIME_QUEUE_SPIN_US": "300"})):
        work = Path(tempfile.mkdtemp(prefix="tw-gpunode-proc-"))
        rt = Runtime(write_tenants(work, 16, gpu_memory="4Mi"), "cuda", work, env=env)
        try:
            record(f"process_ready_s{label}", round(rt.ready_s, 2))
            record(
                f"http_process{label}",
                serial_p50("127.0.0.1", rt.port, {"step": req("step", 0), "noop": req("noop", 0)}),
            )
            from bench_gpu_http import Conn, pct

            conn = Conn(rt.port)
            times: dict[str, list[float]] = {"step": [], "noop": []}
            for rnd in range(6):
                for fn in times:
                    for j in range(256):
                        r = req(fn, (rnd * 256 + j) % 16)
                        t0 = time.perf_counter()
                        conn.call(r)
                        times[fn].append(time.perf_counter() - t0)
            conn.sock.close()
            record(
                f"http_process_16tenants{label}",
                {f"{k}_p50_us": round(pct(v[64:], 0.5), 1) for k, v in times.items()},
            )
        finally:
            rt.stop()


def measure_sharing(rel: DevRelease, targets: list[Target], label: str) -> None:
    shards = sorted({t.shard for t in targets})
    reqs = [(t.pod_ip, 8080, t.request("step")) for t in targets]
    for conns in (8, 32):
        record(f"sharing_{label}_{conns}conn", {"shards": shards, **closed_loop(reqs, conns, 4.0)})


def raw_baseline() -> None:
    from bench_gpu_http import raw_launch_sync

    raw = raw_launch_sync(3000)
    record("raw_baseline", {k: round(v, 2) for k, v in raw.items() if not k.startswith("hop_")})


def diagnostics(plane: GpuControlPlane | None, state: ClusterState | None) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    lines = []
    if plane is not None and state is not None:
        for args in (("get", "pods", "-A", "-o", "wide"), ("get", "events", "-A", "--sort-by=.lastTimestamp"),
                     ("describe", "pods", "-n", NAMESPACE), ("get", "node", "-o", "yaml")):  # fmt: skip
            lines.append(f"$ kubectl {' '.join(args)}\n" + plane.kubectl(state, *args, check=False)[-6000:])
    for name in ("containerd", "kubelet", "kube-proxy", "device-plugin", "kube-apiserver"):
        p = STATE_DIR / f"{name}.log"
        if p.exists():
            lines.append(f"--- {name}.log\n" + "".join(p.read_text(errors="replace").splitlines(True)[-60:]))
    (OUT / "diagnostics.log").write_text("\n".join(lines)[-4_000_000:])


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what == "load":
        load_main(json.loads(sys.argv[2]))
        return 0
    if what == "down":
        down()
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    record("started", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    record(
        "gpu",
        sh(
            "nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"
        ).stdout.strip(),
    )
    plane = state = None
    steps = os.environ.get(
        "TW_GPUNODE_STEPS", "process chart checks pod snapshot sharing mps_off raw"
    ).split()
    try:
        if "process" in steps:  # before the cluster: nothing else on the GPU
            measure_process()
        plane, state = up()
        if what == "up":
            return 0
        rel = install_chart(plane, state)
        targets: list[Target] = []
        deadline = time.monotonic() + float(os.environ.get("TW_GPUNODE_STEP_DEADLINE_S", "1e9"))
        for step in steps:
            if step == "process":
                continue
            if time.monotonic() > deadline:
                record(f"skipped_{step}", "past TW_GPUNODE_STEP_DEADLINE_S")
                continue
            log(f"== {step}")
            try:
                if step == "checks":
                    checks(rel)
                elif step == "snapshot":
                    snapshot_across_restart(rel)
                elif step == "pod":
                    targets = targets or gpu_step_tenants(rel, 8)
                    measure_pod_vs_process(targets, "mps")
                elif step == "sharing":  # shard pods may have been replaced since: new addresses
                    targets = [Target(rel, t.name) for t in targets] if targets else gpu_step_tenants(rel, 8)
                    measure_sharing(rel, targets, "mps_on")
                elif step == "mps_off":
                    t0 = time.monotonic()
                    rel.install("mps.enabled=false", values=(VALUES,), timeout_s=300)
                    wait_for("shards without MPS", lambda: all(
                        pod_ready(p) and not any("MPS" in e["name"] for e in p["spec"]["containers"][0].get("env", []))
                        for p in pods(rel, "runtime-shard")) and pods(rel, "runtime-shard"), 300)  # fmt: skip
                    record("mps_off_rollout_s", round(time.monotonic() - t0, 1))
                    targets = [Target(rel, t.name) for t in targets] if targets else gpu_step_tenants(rel, 8)
                    measure_pod_vs_process(targets, "no_mps")
                    measure_sharing(rel, targets, "mps_off")
                elif step == "raw":
                    raw_baseline()
            except Exception:  # noqa: BLE001 - one failed check must not hide the others
                record(f"failed_{step}", traceback.format_exc()[-3000:])
        return 0
    except Exception:  # noqa: BLE001
        record("failed", traceback.format_exc()[-3000:])
        return 1
    finally:
        diagnostics(plane, state)
        record("finished", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
