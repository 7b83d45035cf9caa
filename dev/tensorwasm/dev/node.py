"""The dev cluster's real node: containerd, kubelet and kube-proxy in a network namespace of their own.

Owns the node's pure config builders (containerd config v3, CNI conflist, KubeletConfiguration,
KubeProxyConfiguration), claiming a network slot, and the host plumbing that `down` must undo: the
node's network namespace and veth link (its bridge and every iptables rule live inside it, so deleting
the namespace removes them), the routes to its pod and Service ranges, its cgroup tree (every daemon,
shim and container of the node runs in it, so `down` can kill exactly those, even after a crash) and
the mounts under its directory. Process spawning and bookkeeping stay in tensorwasm.dev.cluster.
Must not import kopf, the kubernetes client or anything from tensorwasm.runtime.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

NODE_NAME = "tensorwasm-real"
# The real node carries this label and a NoSchedule taint of the same key: only pods that ask for it
# (nodeSelector + toleration, e.g. the chart's values) run there; everything else stays on kwok.
REAL_NODE_LABEL = "tensorwasm.io/real-node"
PAUSE_IMAGE = "tensorwasm.io/pause:3.10"
MAX_SLOTS = 16  # one slot per cluster with a real node on this machine; 10.96-10.111 Service ranges
NODE_COMPONENTS = ("containerd", "kubelet", "kube-proxy")
UNIX_SOCKET_PATH_MAX = 107
CNI_BIN_DIR = "/usr/lib/cni"
RUNC = "/usr/sbin/runc"
CGROUP_ROOT = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/run/netns")
POD_LOG_LINKS = Path("/var/log/containers")  # kubelet writes these links in a fixed place
OWNERS = Path("/run/tensorwasm")  # node-slot-N: which cluster's node directory holds slot N
SHIM_SOCKETS = Path("/run/containerd/s")  # containerd's shims put their sockets here, whatever the config


class NodeError(Exception):
    """The real node could not be set up, started or cleaned up."""


@dataclass(frozen=True)
class NodeNetwork:
    """Every name and range of one slot: two clusters on one machine never share any of them."""

    slot: int

    @property
    def netns(self) -> str:
        return f"tw-node-{self.slot}"

    @property
    def host_veth(self) -> str:
        return f"twh{self.slot}"

    @property
    def node_veth(self) -> str:
        return f"twn{self.slot}"

    @property
    def host_ip(self) -> str:
        return f"10.250.{self.slot}.1"

    @property
    def node_ip(self) -> str:
        return f"10.250.{self.slot}.2"

    @property
    def pod_cidr(self) -> str:
        return f"10.245.{self.slot}.0/24"

    @property
    def service_cidr(self) -> str:
        return f"10.{96 + self.slot}.0.0/16"

    @property
    def cgroup(self) -> str:
        return f"tensorwasm-node-{self.slot}"


@dataclass(frozen=True)
class NodePaths:
    """The node's files, all under one directory of the cluster's state directory."""

    root: Path

    @property
    def containerd_root(self) -> Path:
        return self.root / "containerd"

    @property
    def containerd_state(self) -> Path:
        return self.root / "run" / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "run" / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd.toml"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet.json"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def kube_proxy_config(self) -> Path:
        return self.root / "kube-proxy.json"


# ----- pure builders ---------------------------------------------------------------------------


def build_containerd_config(paths: NodePaths, net: NodeNetwork, pause_image: str = PAUSE_IMAGE) -> str:
    """containerd config v3: own root, state and socket, so it never meets another containerd."""
    return f"""version = 3
root = "{paths.containerd_root}"
state = "{paths.containerd_state}"
# NRI and the zfs/btrfs/devmapper/erofs snapshotters would look for host-wide sockets and devices.
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile", "io.containerd.snapshotter.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{paths.containerd_socket}"

[ttrpc]
  address = "{paths.containerd_socket}.ttrpc"

[plugins.'io.containerd.internal.v1.opt']
  path = "{paths.root / "opt"}"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{pause_image}"

[plugins.'io.containerd.cri.v1.runtime']
  # This machine refuses lowering oom_score_adj below 0, even to root: without this every sandbox
  # fails in runc ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  # Pod network namespaces under our state directory, not /run/netns: `down` finds exactly ours.
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{paths.cni_conf_dir}"
    max_conf_num = 1
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        SystemdCgroup = false

[plugins.'io.containerd.grpc.v1.cri']
  # The streaming server (exec, logs, port-forward) listens inside the node's namespace only.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def build_cni_conflist(net: NodeNetwork) -> str:
    conf = {
        "cniVersion": "1.0.0",
        "name": "tensorwasm",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni-tw0",  # inside the node's namespace, so the name cannot clash
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,  # a pod reaching its own Service lands back on itself
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": net.pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    return json.dumps(conf, indent=2)


def build_kubelet_config(paths: NodePaths, net: NodeNetwork) -> str:
    """KubeletConfiguration (JSON is YAML): cgroup v1 allowed, cgroupfs, no host-wide paths."""
    conf = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,  # Kubernetes 1.35+ refuses cgroup v1 hosts (KEP-5573) unless told
        "cgroupDriver": "cgroupfs",  # no systemd here
        "cgroupRoot": f"/{net.cgroup}",
        "containerRuntimeEndpoint": f"unix://{paths.containerd_socket}",
        "imageServiceEndpoint": f"unix://{paths.containerd_socket}",
        "address": net.node_ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        # Only the API server reaches this address (a link inside this machine); it has no client cert.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "localStorageCapacityIsolation": False,  # the eviction manager cannot stat this VM's disk
        "resolvConf": "",
        "podLogsDir": str(paths.pod_logs),
        "oomScoreAdj": 0,  # lowering it is refused on this machine
        "failSwapOn": False,
        "registerWithTaints": [{"key": REAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"}],
        # A busy shared dev disk must not evict the demo's pods or garbage-collect imported images.
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "maxPods": 110,
    }
    return json.dumps(conf, indent=2)


def build_kube_proxy_config(paths: NodePaths, net: NodeNetwork) -> str:
    conf = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(paths.kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": net.pod_cidr,
        "bindAddress": net.node_ip,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "oomScoreAdj": 0,
        # Leave the conntrack sysctls alone: some are host-wide, not ours to change.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }
    return json.dumps(conf, indent=2)


def build_kubelet_argv(bin_dir: Path, paths: NodePaths, net: NodeNetwork) -> list[str]:
    return [
        str(bin_dir / "kubelet"), f"--config={paths.kubelet_config}", f"--kubeconfig={paths.kubeconfig}",
        f"--root-dir={paths.kubelet_root}", f"--cert-dir={paths.kubelet_root / 'pki'}",
        f"--hostname-override={NODE_NAME}", f"--node-ip={net.node_ip}",
        f"--node-labels={REAL_NODE_LABEL}=true", "--v=1",
    ]  # fmt: skip


def build_containerd_argv(bin_dir: Path, paths: NodePaths) -> list[str]:
    return [str(bin_dir / "containerd"), f"--config={paths.containerd_config}", "--log-level=warn"]


def build_kube_proxy_argv(bin_dir: Path, paths: NodePaths) -> list[str]:
    return [str(bin_dir / "kube-proxy"), f"--config={paths.kube_proxy_config}", "--v=1"]


def check_socket_room(paths: NodePaths) -> None:
    """The kubelet binds unix sockets below its root (pod-resources/<random>, device-plugins/...): a
    socket path over the kernel's 107 bytes fails there with "bind: invalid argument". Say it first."""
    longest = len(str(paths.kubelet_root / "pod-resources" / "1234567890")) + 8
    if longest > UNIX_SOCKET_PATH_MAX:
        raise NodeError(
            f"the cluster directory {paths.root.parent} is too long for the kubelet's sockets "
            f"({longest} > {UNIX_SOCKET_PATH_MAX} bytes): choose a shorter --dir"
        )


def write_node_files(paths: NodePaths, net: NodeNetwork, kubeconfig: str) -> None:
    for d in (paths.root, paths.cni_conf_dir, paths.pod_logs, paths.containerd_state.parent):
        d.mkdir(parents=True, exist_ok=True)
    paths.containerd_config.write_text(build_containerd_config(paths, net))
    (paths.cni_conf_dir / "10-tensorwasm.conflist").write_text(build_cni_conflist(net))
    paths.kubelet_config.write_text(build_kubelet_config(paths, net))
    paths.kube_proxy_config.write_text(build_kube_proxy_config(paths, net))
    paths.kubeconfig.write_text(kubeconfig)
    paths.kubeconfig.chmod(0o600)


# ----- network ---------------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NodeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _owner_file(net: NodeNetwork) -> Path:
    return OWNERS / f"node-slot-{net.slot}"


def claim_network(paths: NodePaths) -> NodeNetwork:
    """The first free slot, claimed by creating its namespace (atomic: `ip netns add` refuses twice),
    and marked with the node directory that owns it so no other cluster's `down` touches it."""
    for slot in range(MAX_SLOTS):
        net = NodeNetwork(slot)
        if (NETNS_DIR / net.netns).exists() or Path(f"/sys/class/net/{net.host_veth}").exists():
            continue
        if _ip("netns", "add", net.netns, check=False).returncode == 0:
            OWNERS.mkdir(parents=True, exist_ok=True)
            _owner_file(net).write_text(str(paths.root))
            return net
    raise NodeError(
        f"all {MAX_SLOTS} real-node slots are taken (network namespaces tw-node-* in {NETNS_DIR}): "
        "stop another cluster with `tensorwasm dev cluster down --dir ...`, or start this one with "
        "--no-real-node"
    )


def in_netns(net: NodeNetwork, argv: list[str]) -> list[str]:
    """Run `argv` in the node's network namespace only (mounts stay shared with the host, so the
    kubelet's volume mounts are seen by runc)."""
    return ["nsenter", f"--net={NETNS_DIR / net.netns}", "--", *argv]


def setup_network(net: NodeNetwork) -> None:
    """veth host<->node, addresses, routes to the node's pod and Service ranges, forwarding inside."""
    ns = net.netns
    _ip("link", "add", net.host_veth, "type", "veth", "peer", "name", net.node_veth, "netns", ns)
    _ip("addr", "add", f"{net.host_ip}/24", "dev", net.host_veth)
    _ip("link", "set", net.host_veth, "up")
    _ip("-n", ns, "link", "set", "lo", "up")
    _ip("-n", ns, "addr", "add", f"{net.node_ip}/24", "dev", net.node_veth)
    _ip("-n", ns, "link", "set", net.node_veth, "up")
    _ip("-n", ns, "route", "add", "default", "via", net.host_ip)
    for dst in (net.pod_cidr, net.service_cidr):
        _ip("route", "add", dst, "via", net.node_ip, "dev", net.host_veth)
    # Per-namespace sysctls: the node routes between its veth and the pod bridge, and bridged pod
    # traffic goes through iptables so a pod can reach a Service backed by a pod on the same bridge.
    for key in ("net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables"):
        path = "/proc/sys/" + key.replace(".", "/")
        subprocess.run(
            in_netns(net, ["sh", "-c", f"[ ! -e {path} ] || echo 1 > {path}"]),
            check=True,
            capture_output=True,
        )


def delete_network(net: NodeNetwork) -> None:
    """Deleting the namespace removes the bridge, the iptables rules, the veth pair and its routes."""
    _ip("netns", "delete", net.netns, check=False)
    _ip("link", "delete", net.host_veth, check=False)  # gone already unless something holds the netns


# ----- cgroups ---------------------------------------------------------------------------------


def cgroup_hierarchies() -> list[Path]:
    """Where to create the node's cgroup: the v2 root, or every v1 controller hierarchy."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    seen: dict[Path, Path] = {}
    for entry in sorted(CGROUP_ROOT.iterdir()):
        if entry.name == "unified" or not (entry / "cgroup.procs").exists():
            continue
        seen.setdefault(entry.resolve(), entry)
    return list(seen.values())


def create_cgroups(net: NodeNetwork) -> list[Path]:
    """The node's cgroup root (the kubelet's cgroupRoot) and its `daemons` child; returns the
    cgroup.procs files a daemon joins."""
    procs = []
    for hierarchy in cgroup_hierarchies():
        for rel in (net.cgroup, f"{net.cgroup}/daemons"):
            path = hierarchy / rel
            path.mkdir(exist_ok=True)
            for knob in ("cpuset.cpus", "cpuset.mems"):  # a new v1 cpuset starts empty: nothing could run
                if hierarchy == CGROUP_ROOT:
                    break  # cgroup v2: an empty cpuset inherits its parent's (and the root has no such file)
                if (path / knob).exists() and not (path / knob).read_text().strip():
                    (path / knob).write_text((path.parent / knob).read_text())
        if hierarchy == CGROUP_ROOT and (hierarchy / "cgroup.controllers").exists():
            wanted = (hierarchy / "cgroup.controllers").read_text().split()
            with suppress(OSError):
                (hierarchy / net.cgroup / "cgroup.subtree_control").write_text(
                    " ".join(f"+{c}" for c in wanted)
                )
        procs.append(hierarchy / net.cgroup / "daemons" / "cgroup.procs")
    return procs


def _cgroup_dirs_deepest_first(net: NodeNetwork) -> Iterator[Path]:
    for hierarchy in cgroup_hierarchies():
        top = hierarchy / net.cgroup
        if top.is_dir():
            yield from sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            yield top


def cgroup_pids(net: NodeNetwork) -> set[int]:
    pids: set[int] = set()
    for d in _cgroup_dirs_deepest_first(net):
        with suppress(OSError):
            pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
    return pids


def kill_cgroup_processes(net: NodeNetwork, timeout_s: float = 30.0) -> int:
    """SIGKILL every process in the node's cgroups (daemons, shims, containers) until none is left."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while pids := cgroup_pids(net):
        if time.monotonic() > deadline:
            raise NodeError(f"processes {sorted(pids)} in cgroup {net.cgroup} survived SIGKILL")
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        killed |= pids
        time.sleep(0.05)
    return len(killed)


def remove_cgroups(net: NodeNetwork) -> None:
    for d in _cgroup_dirs_deepest_first(net):
        with suppress(FileNotFoundError):
            d.rmdir()


# ----- mounts and leftovers ---------------------------------------------------------------------


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below `root` (this mount namespace), deepest first."""
    found = []
    prefix = str(root.resolve())
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # \040 etc. in paths
        if point == prefix or point.startswith(prefix + "/"):
            found.append(Path(point))
    return sorted(set(found), key=lambda p: -len(p.parts))


def unmount_all(root: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    mnt_detach = 2
    for _ in range(5):  # a lazy unmount can reveal a mount stacked beneath it
        points = mounts_under(root)
        if not points:
            return
        for point in points:
            libc.umount2(str(point).encode(), mnt_detach)
    left = mounts_under(root)
    if left:
        raise NodeError(f"could not unmount {', '.join(map(str, left))}")


def remove_pod_log_links(paths: NodePaths) -> None:
    """The kubelet links each container's log into /var/log/containers; remove ours only."""
    if not POD_LOG_LINKS.is_dir():
        return
    ours = str(paths.pod_logs.resolve())
    for link in POD_LOG_LINKS.iterdir():
        with suppress(OSError):
            if link.is_symlink() and os.readlink(link).startswith(ours):
                link.unlink()


def shim_sockets(paths: NodePaths) -> list[Path]:
    """The shim sockets of our containerd's tasks: named sha256(<containerd address>/<ns>/<task id>)."""
    tasks = paths.containerd_state / "io.containerd.runtime.v2.task"
    found = []
    for task in tasks.glob("*/*") if tasks.is_dir() else ():
        base = os.path.join(paths.containerd_socket, task.parent.name, task.name)
        for name in (base, os.path.join(base, "debug")):
            socket = SHIM_SOCKETS / hashlib.sha256(name.encode()).hexdigest()
            if socket.exists():
                found.append(socket)
    return found


def owner_of(net: NodeNetwork) -> str | None:
    with suppress(FileNotFoundError):
        return _owner_file(net).read_text()
    return None


def clean_up(net: NodeNetwork, paths: NodePaths) -> bool:
    """Undo everything the node created on the host; safe to repeat and after a crash. False (and
    nothing touched) when the slot now belongs to another cluster's node."""
    owner = owner_of(net)
    if owner is not None and owner != str(paths.root):
        return False
    kill_cgroup_processes(net)
    for socket in shim_sockets(paths):  # a killed shim leaves its socket behind
        socket.unlink(missing_ok=True)
    unmount_all(paths.root)
    remove_pod_log_links(paths)
    remove_cgroups(net)
    delete_network(net)
    _owner_file(net).unlink(missing_ok=True)
    return True


def leftovers(net: NodeNetwork, paths: NodePaths) -> list[str]:
    """What of this node still exists on the host (empty once `clean_up` ran): for tests and status."""
    found = []
    if (NETNS_DIR / net.netns).exists():
        found.append(f"netns {net.netns}")
    if Path(f"/sys/class/net/{net.host_veth}").exists():
        found.append(f"link {net.host_veth}")
    found += [f"mount {p}" for p in mounts_under(paths.root)] if paths.root.exists() else []
    found += [f"cgroup {d}" for d in _cgroup_dirs_deepest_first(net)]
    found += [f"shim socket {p}" for p in shim_sockets(paths)]
    found += [
        f"route {r}" for r in _ip("route", "show", "dev", net.host_veth, check=False).stdout.splitlines()
    ]
    return found
