"""The local development control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok as processes on 127.0.0.1, plus (by default) one real node (containerd,
kubelet, kube-proxy; see tensorwasm.dev.node), described by one state directory.

Owns starting, reusing, inspecting and stopping those processes (by PID, never by name) and
writing the kubeconfig. The binaries come from hack/controlplane/build.sh. Used by
`tensorwasm dev cluster`, `make cluster-up/-down`, the pytest `kube` fixture and `make demo`.
Must not import kopf, the kubernetes client or anything from tensorwasm.runtime.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tensorwasm.dev import node as real_node

REPO_ROOT = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO_ROOT / "hack" / "controlplane" / "build.sh"
HPA_SYNC_ENV = "TENSORWASM_DEV_HPA_SYNC_PERIOD"  # read at `up`: the HPA controller's sync period
STATE_FILE = "cluster.json"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
# Order matters: each process needs the ones before it.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
ALL_COMPONENTS = COMPONENTS + real_node.NODE_COMPONENTS


class ClusterError(Exception):
    """The local control plane could not be built, started, reused or stopped."""


def default_state_dir() -> Path:
    override = os.environ.get("TENSORWASM_DEV_CLUSTER_DIR")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "tensorwasm" / "dev-cluster"


@dataclass
class ClusterState:
    """What `up` started: enough for `status` and `down` to act on exactly these processes."""

    state_dir: str
    bin_dir: str
    server: str
    kubeconfig: str
    token: str
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    started_at: float = 0.0
    # The real node's network slot (tensorwasm.dev.node.NodeNetwork); None: kwok nodes only.
    node_slot: int | None = None
    service_cidr: str = SERVICE_CLUSTER_IP_RANGE

    @property
    def node_network(self) -> real_node.NodeNetwork | None:
        return None if self.node_slot is None else real_node.NodeNetwork(self.node_slot)

    @property
    def node_paths(self) -> real_node.NodePaths:
        return real_node.NodePaths(Path(self.state_dir) / "node")

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState | None:
        path = state_dir / STATE_FILE
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)


@dataclass(frozen=True)
class ClusterStatus:
    running: dict[str, bool]
    ready: bool
    detail: str

    @property
    def all_running(self) -> bool:
        return all(self.running.values()) and bool(self.running)

    @property
    def none_running(self) -> bool:
        return not any(self.running.values())


def build_binaries(log: Callable[[str], None] = print) -> Path:
    """Build (once) or find the control-plane binaries; progress streams to stderr."""
    override = os.environ.get("TENSORWASM_CONTROLPLANE_BIN")
    if override:
        return Path(override)
    if not BUILD_SCRIPT.exists():
        raise ClusterError(f"{BUILD_SCRIPT} not found: run from a TensorWasm checkout")
    log("Building or reusing the control plane binaries (hack/controlplane/build.sh)")
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=sys.stderr, text=True, check=False
    )
    if proc.returncode != 0:
        raise ClusterError(f"hack/controlplane/build.sh failed with exit code {proc.returncode}")
    return Path(proc.stdout.strip().splitlines()[-1])


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def pid_alive(pid: int, binary: str | None = None) -> bool:
    """True when `pid` runs and (if given) its executable is `binary`: PIDs get reused."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if binary is None:
        return True
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    # A zombie (exited, not yet reaped) has no exe link target. The Kubernetes components are
    # symlinks to one multi-call binary: compare with what the link names.
    return Path(exe.removesuffix(" (deleted)")).name == Path(binary).resolve().name


def build_kubeconfig(server: str, ca_file: Path, token: str) -> str:
    ca_b64 = base64.b64encode(ca_file.read_bytes()).decode()
    return (
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: tensorwasm-dev\n  cluster:\n    server: {server}\n"
        f"    certificate-authority-data: {ca_b64}\n"
        f"users:\n- name: admin\n  user:\n    token: {token}\n"
        "contexts:\n- name: tensorwasm-dev\n  context:\n    cluster: tensorwasm-dev\n    user: admin\n"
        "current-context: tensorwasm-dev\n"
    )


def build_serving_cert_sans(state: ClusterState) -> list[str]:
    """Every name the API server is dialled by: the host (127.0.0.1), pods (the `kubernetes` Service
    IP) and, with a real node, the kubelet and kube-proxy (the host end of the node's veth)."""
    service_ip = ipaddress.ip_network(state.service_cidr)[1]
    sans = ["IP:127.0.0.1", f"IP:{service_ip}", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"]  # fmt: skip
    if state.node_network is not None:
        sans.append(f"IP:{state.node_network.host_ip}")
    return sans


def write_serving_cert(pki: Path, sans: Sequence[str]) -> None:
    """A self-signed serving certificate: the kubeconfig's and the pods' CA is this certificate."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
         "-keyout", str(pki / "apiserver.key"), "-out", str(pki / "apiserver.crt"),
         "-subj", "/CN=tensorwasm-dev-apiserver", "-addext", "subjectAltName=" + ",".join(sans)],
        check=True, capture_output=True,
    )  # fmt: skip
    (pki / "apiserver.key").chmod(0o600)


def write_front_proxy_certs(pki: Path) -> list[str]:
    """The aggregation layer's client identity: the API server proxies requests for an APIService
    (KEDA's external.metrics.k8s.io) with this certificate, and the extension server trusts the user
    headers it sets because the CA is in kube-system/extension-apiserver-authentication."""
    ca, client = pki / "front-proxy-ca", pki / "front-proxy-client"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
         "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-subj", "/CN=tensorwasm-dev-front-proxy-ca"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{client}.key",
         "-out", f"{client}.csr", "-subj", "/CN=front-proxy-client"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "x509", "-req", "-in", f"{client}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
         "-CAcreateserial", "-days", "3650", "-out", f"{client}.crt",
         "-extfile", "/dev/stdin"],
        input="extendedKeyUsage=clientAuth\n", text=True, check=True, capture_output=True,
    )  # fmt: skip
    for key in (f"{ca}.key", f"{client}.key"):
        Path(key).chmod(0o600)
    return [
        f"--requestheader-client-ca-file={ca}.crt", "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={client}.crt", f"--proxy-client-key-file={client}.key",
        # Dial an APIService's endpoint (a pod address, routed from the host), not its ClusterIP.
        "--enable-aggregator-routing=true",
    ]  # fmt: skip


def build_fake_node(name: str, gpus: int) -> dict[str, object]:
    """A kwok-managed node; GPU nodes advertise nvidia.com/gpu like the device plugin would."""
    capacity = {"cpu": "16", "memory": "128Gi", "pods": "110"}
    labels = {"kubernetes.io/hostname": name, "type": "kwok", "kubernetes.io/os": "linux"}
    if gpus:
        capacity["nvidia.com/gpu"] = str(gpus)
        labels["nvidia.com/gpu.present"] = "true"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": {FAKE_NODE_ANNOTATION: "fake"}, "labels": labels},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


class LocalControlPlane:
    """Start, reuse, inspect and stop the processes recorded in one state directory."""

    def __init__(self, state_dir: Path | None = None, log: Callable[[str], None] = print) -> None:
        self.state_dir = (state_dir or default_state_dir()).resolve()
        self.log = log

    # ----- inspection -------------------------------------------------------------------------

    def state(self) -> ClusterState | None:
        return ClusterState.load(self.state_dir)

    def status(self) -> ClusterStatus:
        state = self.state()
        if state is None:
            return ClusterStatus(running={}, ready=False, detail=f"no cluster recorded in {self.state_dir}")
        running = {name: pid_alive(pid, str(Path(state.bin_dir) / name)) for name, pid in state.pids.items()}
        ready, detail = self._probe_readyz(state)
        return ClusterStatus(running=running, ready=ready, detail=detail)

    def _probe_readyz(self, state: ClusterState) -> tuple[bool, str]:
        ctx = ssl.create_default_context(cafile=str(Path(state.state_dir) / "pki" / "apiserver.crt"))
        ctx.check_hostname = False  # the self-signed serving cert names the host, we dial 127.0.0.1
        req = urllib.request.Request(
            f"{state.server}/readyz", headers={"Authorization": f"Bearer {state.token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=2, context=ctx) as resp:
                return resp.status == 200, resp.read().decode(errors="replace").strip()
        except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
            return False, f"/readyz not answering: {exc}"

    # ----- up ---------------------------------------------------------------------------------

    def up(
        self, nodes: int = 2, gpus_per_node: int = 1, timeout_s: float = 120.0, with_real_node: bool = True
    ) -> ClusterState:
        """Start a new control plane (and real node), or reuse the healthy one already recorded here."""
        existing = self.state()
        if existing is not None:
            status = self.status()
            if status.all_running and status.ready:
                self.log(f"Reused running cluster: kubeconfig={existing.kubeconfig}")
                return existing
            if not status.none_running:
                alive = ", ".join(n for n, ok in status.running.items() if ok)
                stopped = ", ".join(n for n, ok in status.running.items() if not ok) or "none"
                raise ClusterError(
                    f"a partly running cluster is recorded in {self.state_dir} (alive: {alive}; "
                    f"stopped: {stopped}; {status.detail}). Run `tensorwasm dev cluster down` first."
                )
            self.log(f"Removed stale state of a stopped cluster in {self.state_dir}")
            self._clean_up_node(existing)
            shutil.rmtree(self.state_dir)

        bin_dir = build_binaries(self.log)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        names = ("etcd-client", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        token = secrets.token_hex(24)
        state = ClusterState(
            state_dir=str(self.state_dir),
            bin_dir=str(bin_dir),
            server=f"https://127.0.0.1:{ports['apiserver']}",
            kubeconfig=str(self.state_dir / "kubeconfig"),
            token=token,
            ports=ports,
            started_at=time.time(),
        )
        state.save()
        try:
            if with_real_node:
                self._claim_node_network(state)
            self._start_all(state, nodes, gpus_per_node, timeout_s)
        except BaseException:
            self.log("Start failed; stopping what was started (logs kept in " + str(self.state_dir) + ")")
            self._stop_processes(state)
            self._clean_up_node(state)
            raise
        self.log(
            f"Started cluster in {time.time() - state.started_at:.1f}s: server={state.server} "
            f"kubeconfig={state.kubeconfig}"
        )
        return state

    def _start_all(self, state: ClusterState, nodes: int, gpus_per_node: int, timeout_s: float) -> None:
        sd, bd, p = Path(state.state_dir), Path(state.bin_dir), state.ports
        pki = sd / "pki"
        pki.mkdir(exist_ok=True)
        sa_key = pki / "sa.key"
        subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
        write_serving_cert(pki, build_serving_cert_sans(state))
        aggregation_args = write_front_proxy_certs(pki)
        (pki / "tokens.csv").write_text(f"{state.token},admin,admin,system:masters\n")
        sa_key.chmod(0o600)

        self._spawn(state, "etcd", [
            str(bd / "etcd"), "--name=default", f"--data-dir={sd / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{p['etcd-client']}",
            f"--advertise-client-urls=http://127.0.0.1:{p['etcd-client']}",
            f"--listen-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
            f"--initial-cluster=default=http://127.0.0.1:{p['etcd-peer']}",
            "--log-level=warn", "--unsafe-no-fsync=true",
        ])  # fmt: skip
        self._spawn(state, "kube-apiserver", [
            str(bd / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{p['etcd-client']}",
            "--bind-address=127.0.0.1", f"--secure-port={p['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC", "--allow-privileged=true",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={sa_key}", f"--service-account-signing-key-file={sa_key}",
            f"--service-cluster-ip-range={state.service_cidr}",
            "--enable-priority-and-fairness=false", "--v=0",
            # Nothing resolves node names here: logs, exec and port-forward dial the node's address.
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            *aggregation_args,
            *self._apiserver_address_args(state),
        ])  # fmt: skip
        self._write_kubeconfig_when_cert_exists(state, timeout_s)
        self._wait_ready(state, timeout_s)

        kubeconfig = state.kubeconfig
        self._spawn(state, "kube-controller-manager", [
            str(bd / "kube-controller-manager"), f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={p['controller-manager']}",
            f"--service-account-private-key-file={sa_key}", f"--root-ca-file={pki / 'apiserver.crt'}",
            "--use-service-account-credentials=false", "--controllers=*",
            f"--service-cluster-ip-range={state.service_cidr}",
            "--concurrent-statefulset-syncs=5", "--v=0",
            # How often HPAs read their metrics: Kubernetes' 15 s unless set (docs/helm.md, Autoscaling).
            f"--horizontal-pod-autoscaler-sync-period={os.environ.get(HPA_SYNC_ENV, '15s')}",
        ])  # fmt: skip
        self._spawn(state, "kube-scheduler", [
            str(bd / "kube-scheduler"), f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={p['scheduler']}",
            "--v=0",
        ])  # fmt: skip
        stages = Path(state.bin_dir).parent / "kwok-stages"
        stage_args = [f"--config={f}" for f in sorted(stages.glob("*.yaml"))]
        self._spawn(state, "kwok", [
            str(bd / "kwok"), f"--kubeconfig={kubeconfig}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{p['kwok']}",
            "--cidr=10.244.0.0/16", "--node-ip=10.0.0.1",
            *stage_args,
        ])  # fmt: skip
        state.nodes = [f"tensorwasm-node-{i}" for i in range(nodes)]
        manifest = "\n---\n".join(json.dumps(build_fake_node(n, gpus_per_node)) for n in state.nodes)
        self.kubectl(state, "apply", "-f", "-", input_text=manifest)
        state.save()
        self._wait_nodes_ready(state, timeout_s)
        if state.node_slot is not None:
            self._start_real_node(state, timeout_s)

    # ----- the real node ----------------------------------------------------------------------

    def _claim_node_network(self, state: ClusterState) -> None:
        real_node.check_socket_room(state.node_paths)  # before claiming anything
        net = real_node.claim_network(state.node_paths)
        state.node_slot, state.service_cidr = net.slot, net.service_cidr
        state.save()  # recorded before anything else exists: `down` after a crash finds it
        self.log(f"Claimed real-node slot {net.slot}: netns={net.netns} pods={net.pod_cidr} "
                 f"services={net.service_cidr}")  # fmt: skip
        real_node.setup_network(net)

    @staticmethod
    def _apiserver_address_args(state: ClusterState) -> list[str]:
        net = state.node_network
        if net is None:
            return []
        # Pods reach the API server through the `kubernetes` Service, whose endpoint is this address
        # (the host end of the node's veth); 127.0.0.1 keeps serving the host's clients.
        return ["--bind-address=0.0.0.0", f"--advertise-address={net.host_ip}"]

    def _start_real_node(self, state: ClusterState, timeout_s: float) -> None:
        net = state.node_network
        assert net is not None
        ca = Path(state.state_dir) / "pki" / "apiserver.crt"
        server = f"https://{net.host_ip}:{state.ports['apiserver']}"
        real_node.write_node_files(state.node_paths, net, build_kubeconfig(server, ca, state.token))
        real_node.create_cgroups(net)
        self._spawn_node_component(state, "containerd", timeout_s)
        self.import_image(state, Path(state.bin_dir).parent / "images" / "pause.oci.tar")
        self._spawn_node_component(state, "kubelet", timeout_s)
        self._spawn_node_component(state, "kube-proxy", timeout_s)
        self._wait_real_node_ready(state, timeout_s)

    def _spawn_node_component(self, state: ClusterState, name: str, timeout_s: float) -> None:
        net, paths, bd = state.node_network, state.node_paths, Path(state.bin_dir)
        assert net is not None
        argv = {
            "containerd": real_node.build_containerd_argv(bd, paths),
            "kubelet": real_node.build_kubelet_argv(bd, paths, net),
            "kube-proxy": real_node.build_kube_proxy_argv(bd, paths),
        }[name]
        self._spawn(state, name, real_node.in_netns(net, argv), cgroup_procs=real_node.create_cgroups(net))
        if name == "containerd":
            for _ in self._poll(timeout_s, "containerd to answer", state, "containerd"):
                if self._ctr(state, "version", check=False).returncode == 0:
                    break

    def restart(self, component: str, timeout_s: float = 120.0) -> ClusterState:
        """Start one stopped (crashed, killed) component of the real node again, as `up` started it."""
        state = self.state()
        if state is None:
            raise ClusterError(f"no cluster recorded in {self.state_dir}")
        if state.node_slot is None or component not in real_node.NODE_COMPONENTS:
            raise ClusterError(
                f"restart starts a stopped real-node component ({', '.join(real_node.NODE_COMPONENTS)}); "
                f"for {component!r} run `down` and `up`"
            )
        pid = state.pids.get(component)
        if pid is not None and pid_alive(pid, str(Path(state.bin_dir) / component)):
            raise ClusterError(f"{component} is running (pid {pid}); nothing to restart")
        self._spawn_node_component(state, component, timeout_s)
        return state

    def _wait_real_node_ready(self, state: ClusterState, timeout_s: float) -> None:
        jsonpath = '{.status.conditions[?(@.type=="Ready")].status}'
        for _ in self._poll(timeout_s, f"node {real_node.NODE_NAME} to become Ready", state, "kubelet"):
            out = self.kubectl(
                state, "get", "node", real_node.NODE_NAME, "-o", f"jsonpath={jsonpath}", check=False
            )
            if out.strip() == "True":
                self.log(f"Real node {real_node.NODE_NAME} is Ready")
                return

    def _ctr(self, state: ClusterState, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(Path(state.bin_dir) / "ctr"), f"--address={state.node_paths.containerd_socket}",
                "--namespace=k8s.io", *args]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if check and proc.returncode != 0:
            raise ClusterError(f"ctr {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def import_image(self, state: ClusterState, archive: Path) -> str:
        """Import an OCI/docker image archive into the real node's containerd (no registry needed)."""
        if state.node_slot is None:
            raise ClusterError(
                f"the cluster in {state.state_dir} has no real node (started with --no-real-node)"
            )
        if not archive.is_file():
            raise ClusterError(f"image archive {archive} not found")
        out = self._ctr(state, "images", "import", str(archive)).stdout
        self.log(f"Imported {archive} into the real node: {out.strip()}")
        return out

    def _clean_up_node(self, state: ClusterState) -> None:
        net = state.node_network
        if net is None:
            return
        try:
            cleaned = real_node.clean_up(net, state.node_paths)
        except real_node.NodeError as exc:
            raise ClusterError(f"cleaning up the real node failed: {exc}") from exc
        if cleaned:
            self.log(f"Removed the real node's netns {net.netns}, cgroups, mounts and routes")
        else:
            self.log(f"Left slot {net.slot} alone: it now belongs to {real_node.owner_of(net)}")

    def _spawn(
        self, state: ClusterState, name: str, argv: Sequence[str], cgroup_procs: Sequence[Path] = ()
    ) -> None:
        log_path = Path(state.state_dir) / f"{name}.log"

        def join_cgroups() -> None:  # in the child before exec: everything it starts inherits them
            for procs in cgroup_procs:
                procs.write_text(str(os.getpid()))

        with open(log_path, "ab") as log_file:
            # A new session: the daemon outlives `up`, and Ctrl-C in the caller's shell doesn't reach it.
            proc = subprocess.Popen(
                list(argv), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=state.state_dir,
                preexec_fn=join_cgroups if cgroup_procs else None,
            )  # fmt: skip
        state.pids[name] = proc.pid
        state.save()
        self.log(f"Started {name} pid={proc.pid} log={log_path}")
        time.sleep(0.2)
        if proc.poll() is not None:
            raise ClusterError(f"{name} exited at once with code {proc.returncode}; see {log_path}")

    def _write_kubeconfig_when_cert_exists(self, state: ClusterState, timeout_s: float) -> None:
        cert = Path(state.state_dir) / "pki" / "apiserver.crt"
        for _ in self._poll(timeout_s, f"kube-apiserver to write {cert}", state, "kube-apiserver"):
            if cert.exists() and cert.stat().st_size > 0:
                break
        kubeconfig = Path(state.kubeconfig)
        kubeconfig.write_text(build_kubeconfig(state.server, cert, state.token))
        kubeconfig.chmod(0o600)

    def _wait_ready(self, state: ClusterState, timeout_s: float) -> None:
        for _ in self._poll(timeout_s, "kube-apiserver /readyz", state, "kube-apiserver"):
            ready, _detail = self._probe_readyz(state)
            if ready:
                return

    def _wait_nodes_ready(self, state: ClusterState, timeout_s: float) -> None:
        jsonpath = '{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}'
        for _ in self._poll(timeout_s, "fake nodes to become Ready", state, "kwok"):
            out = self.kubectl(state, "get", "nodes", "-o", f"jsonpath={jsonpath}", check=False)
            if out.split().count("True") >= len(state.nodes):
                return

    def _poll(self, timeout_s: float, what: str, state: ClusterState, proc: str) -> Iterator[None]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            yield
            pid = state.pids.get(proc)
            if pid is not None and not pid_alive(pid, str(Path(state.bin_dir) / proc)):
                log = Path(state.state_dir) / f"{proc}.log"
                tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:]) if log.exists() else ""
                raise ClusterError(f"{proc} exited while waiting for {what}; last log lines:\n{tail}")
            time.sleep(0.2)
        raise ClusterError(f"timed out after {timeout_s:.0f}s waiting for {what}")

    # ----- kubectl ----------------------------------------------------------------------------

    def kubectl(
        self, state: ClusterState, *args: str, input_text: str | None = None, check: bool = True
    ) -> str:
        proc = subprocess.run(
            [str(Path(state.bin_dir) / "kubectl"), f"--kubeconfig={state.kubeconfig}", *args],
            input=input_text, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    # ----- down -------------------------------------------------------------------------------

    def down(self) -> bool:
        """Stop exactly the recorded processes and remove the state directory. False if none."""
        state = self.state()
        if state is None:
            if self.state_dir.exists():
                shutil.rmtree(self.state_dir)
            return False
        self._stop_processes(state)
        self._clean_up_node(state)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.log(f"Stopped cluster and removed {self.state_dir}")
        return True

    def _stop_processes(self, state: ClusterState) -> None:
        # Reverse start order: the node and clients first, etcd last, so nothing logs a storm of
        # reconnects. The node's shims and containers are not ours to signal one by one: its
        # cgroup tree is emptied afterwards (_clean_up_node).
        for name in reversed(ALL_COMPONENTS):
            pid = state.pids.get(name)
            if pid is None:
                continue
            binary = str(Path(state.bin_dir) / name)
            if not pid_alive(pid, binary):
                continue
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and pid_alive(pid, binary):
                _reap(pid)
                time.sleep(0.05)
            if pid_alive(pid, binary):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _reap(pid)
            self.log(f"Stopped {name} pid={pid}")


def _reap(pid: int) -> None:
    """Collect the exit status when the daemon is our own child (same process as `up`)."""
    with suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
