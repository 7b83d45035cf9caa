"""A real Prometheus on the dev cluster's real node, scraping shard pods as the chart's ServiceMonitor does.

Owns: the Prometheus image (Debian's statically configured /usr/bin/prometheus and the shared libraries
it links, one layer written by hack/image/ociarchive.py), the objects that run it (ServiceAccount,
Role/RoleBinding per watched namespace, ConfigMap, Deployment, Service) as pure builders, and
`up`/`query` against a recorded dev cluster. Debian builds Prometheus without kubernetes_sd_configs,
so a sidecar (hack/prometheus/discover.py, run by the tensorwasm image's python3) does the discovery
the ServiceMonitor asks for (EndpointSlices of Services labelled as the operator labels shard
Services, port `admin`) and writes file_sd targets labelled the way prometheus-operator labels them
(job = Service name, namespace, service, pod, endpoint), so the chart's alerts and dashboard
queries match either path.
Used by `tensorwasm dev prometheus` and tests/cluster/test_prometheus.py. Must not import the runtime
or the operator.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tensorwasm.dev.cluster import REPO_ROOT, ClusterError, ClusterState, LocalControlPlane
from tensorwasm.dev.node import NODE_NAME, REAL_NODE_LABEL

PROMETHEUS_BINARY = Path("/usr/bin/prometheus")  # Debian's `prometheus` (hack/node/deps.sh installs it)
OCIARCHIVE = REPO_ROOT / "hack" / "image" / "ociarchive.py"
IMAGES = Path.home() / ".cache" / "tensorwasm" / "images"
NAME = "prometheus"
PORT = 9090
UID = 65534  # nobody: the data directory is an emptyDir, nothing else is written
# Labels the operator puts on every shard Service (tensorwasm.operator.desired.meta.shard_labels), whatever
# shard.name is; the chart's ServiceMonitor selects component and name. Duplicated, not imported: the
# dev tools must not import the operator (tests/cluster/test_prometheus.py checks the two agree).
SHARD_SERVICE_LABELS = {
    "app.kubernetes.io/component": "runtime-shard",
    "app.kubernetes.io/managed-by": "tensorwasm-operator",
}
SCRAPE_PORT_NAME = "admin"
DISCOVERY_SCRIPT = REPO_ROOT / "hack" / "prometheus" / "discover.py"
DEFAULT_DISCOVERY_IMAGE = "tensorwasm.io/tensorwasm:0.1.0-dev"  # examples/values-dev-cluster.yaml's
SD_DIR = "/sd"


def image_ref(binary: Path = PROMETHEUS_BINARY) -> str:
    """Tag by the binary's digest, so a Debian upgrade makes a new image and the old one stays put."""
    return f"tensorwasm.io/prometheus:{hashlib.sha256(binary.read_bytes()).hexdigest()[:12]}"


def linked_libraries(binary: Path) -> list[Path]:
    """The shared objects `ldd` resolves for the binary (libc and the loader, for Debian's build)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    return sorted({Path(p) for p in re.findall(r"(/\S+\.so[.\d]*)", out)})


def build_image(log: Callable[[str], None] = print, binary: Path = PROMETHEUS_BINARY) -> tuple[str, Path]:
    """The image archive (cached by the binary's digest): its reference and path."""
    if not binary.exists():
        raise ClusterError(f"{binary} not found: run `make deps` (installs Debian's prometheus package)")
    ref = image_ref(binary)
    archive = IMAGES / f"prometheus-{ref.rsplit(':', 1)[1]}.oci.tar"
    if archive.exists():
        return ref, archive
    IMAGES.mkdir(parents=True, exist_ok=True)
    layer = archive.with_suffix(".layer.tar")
    with tarfile.open(layer, "w") as tar:
        tar.add(binary, arcname="bin/prometheus")
        for lib in linked_libraries(binary):
            tar.add(lib.resolve(), arcname=str(lib).lstrip("/"))  # the path ldd names, the file's bytes
        for directory in ("tmp", "prometheus"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777
            tar.addfile(info)
    subprocess.run(
        [sys.executable, str(OCIARCHIVE), "--name", ref, "--layer", str(layer), "--user", str(UID),
         "--entrypoint", '["/bin/prometheus"]', "--out", str(archive)],
        check=True, capture_output=True,
    )  # fmt: skip
    layer.unlink()
    log(f"Built {ref} ({archive})")
    return ref, archive


def build_config(interval: str = "5s") -> dict[str, Any]:
    """prometheus.yml: one job over the targets the discovery sidecar writes (already labelled)."""
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [{
            "job_name": "tensorwasm-shards",  # each target's own job label (its Service) wins
            "metrics_path": "/metrics",
            "file_sd_configs": [{"files": [f"{SD_DIR}/*.json"], "refresh_interval": interval}],
        }],
    }  # fmt: skip


def discovery_args(watch: Sequence[str]) -> list[str]:
    """The sidecar's command: the ServiceMonitor's selection (Service labels, port name)."""
    selector = ",".join(f"{k}={v}" for k, v in SHARD_SERVICE_LABELS.items())
    return [
        "python3",
        "/etc/discovery/discover.py",
        f"{SD_DIR}/shards.json",
        selector,
        SCRAPE_PORT_NAME,
        *watch,
    ]


def build_objects(
    namespace: str, watch: Sequence[str], image: str, discovery_image: str, script: str
) -> list[dict[str, Any]]:
    """Everything `up` applies, in order."""
    labels = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": "tensorwasm-dev"}
    config = json.dumps(build_config(), indent=1)  # JSON is YAML
    access: list[dict[str, Any]] = []
    role = f"{NAME}-{namespace}"
    for ns in watch:  # read-only, and only where the shards are
        access.append({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": role, "namespace": ns, "labels": labels},
            "rules": [
                {"apiGroups": [""], "resources": ["services", "endpoints", "pods"],
                 "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                 "verbs": ["get", "list", "watch"]},
            ],
        })  # fmt: skip
        access.append({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": role, "namespace": ns, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": namespace}],
        })  # fmt: skip
    pod_spec = {
        "serviceAccountName": NAME,
        "nodeSelector": {REAL_NODE_LABEL: "true"},
        "tolerations": [{"key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": NAME, "image": image, "imagePullPolicy": "Never",
            "args": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus",
                     f"--web.listen-address=:{PORT}", "--storage.tsdb.retention.time=2h"],
            "ports": [{"name": "web", "containerPort": PORT}],
            "readinessProbe": {"httpGet": {"path": "/-/ready", "port": PORT}, "periodSeconds": 2},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
            "volumeMounts": [{"name": "config", "mountPath": "/etc/prometheus"},
                             {"name": "data", "mountPath": "/prometheus"},
                             {"name": "sd", "mountPath": SD_DIR, "readOnly": True}],
        }, {
            # Debian's Prometheus has no kubernetes_sd_configs: this sidecar discovers for it.
            "name": "discovery", "image": discovery_image, "imagePullPolicy": "IfNotPresent",
            "command": discovery_args(watch),
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
            "volumeMounts": [{"name": "discovery", "mountPath": "/etc/discovery"},
                             {"name": "sd", "mountPath": SD_DIR}],
        }],
        "volumes": [
            {"name": "config", "configMap": {"name": NAME}},
            {"name": "discovery", "configMap": {"name": f"{NAME}-discovery"}},
            {"name": "data", "emptyDir": {}},
            {"name": "sd", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        ],
    }  # fmt: skip
    meta = {"name": NAME, "namespace": namespace, "labels": labels}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        *access,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"prometheus.yml": config}},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {**meta, "name": f"{NAME}-discovery"},
            "data": {"discover.py": script},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "strategy": {"type": "Recreate"},
                "template": {
                    # A changed config rolls the pod (Prometheus does not watch its file here).
                    "metadata": {
                        "labels": labels,
                        "annotations": {"tensorwasm.io/config-sha256": _sha256(config + script)},
                    },
                    "spec": pod_spec,
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {"selector": labels, "ports": [{"name": "web", "port": PORT, "targetPort": PORT}]},
        },
    ]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class DevPrometheus:
    """Prometheus in `namespace` of a recorded dev cluster, scraping the shards of `watch`."""

    def __init__(
        self,
        plane: LocalControlPlane,
        state: ClusterState,
        namespace: str,
        watch: Sequence[str],
        discovery_image: str = DEFAULT_DISCOVERY_IMAGE,
        log: Callable[[str], None] = print,
    ) -> None:
        self.discovery_image = discovery_image
        if state.node_slot is None:
            raise ClusterError("Prometheus runs on the real node: start the cluster without --no-real-node")
        self.plane, self.state, self.namespace, self.watch, self.log = plane, state, namespace, watch, log

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        return self.plane.kubectl(self.state, *args, input_text=input_text, check=check)

    def up(self, timeout_s: float = 180) -> str:
        """Build and import the image, apply, wait until the pod is Ready; returns the query URL.

        The discovery image (python3) must already be on the node: the chart's image, imported by a
        chart install (tensorwasm.dev.chart) or `tensorwasm dev cluster import-image`.
        """
        ref, archive = build_image(self.log)
        self.plane.import_image(self.state, archive)
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}}
        script = DISCOVERY_SCRIPT.read_text()
        items = [namespace, *build_objects(self.namespace, self.watch, ref, self.discovery_image, script)]
        self.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-",
            input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )  # fmt: skip
        self.kubectl(
            "rollout", "status", f"deployment/{NAME}", "-n", self.namespace, f"--timeout={int(timeout_s)}s"
        )
        self.log(f"Prometheus {ref} Ready on {NODE_NAME}, scraping shards in {', '.join(self.watch)}")
        return self.url()

    def url(self) -> str:
        """The Service's ClusterIP: kube-proxy routes it from the host."""
        ip = self.kubectl("get", "service", NAME, "-n", self.namespace, "-o", "jsonpath={.spec.clusterIP}")
        return f"http://{ip.strip()}:{PORT}"

    def down(self) -> None:
        for ns in self.watch:
            self.kubectl("delete", "role,rolebinding", f"{NAME}-{self.namespace}", "-n", ns,
                         "--ignore-not-found", check=False)  # fmt: skip
        self.kubectl(
            "delete", "namespace", self.namespace, "--ignore-not-found", "--timeout=120s", check=False
        )


def api(url: str, path: str, **params: str) -> Any:
    """GET one Prometheus HTTP API endpoint; returns its `data` (raises on an error status)."""
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}{path}?{query}", timeout=10) as response:
        body = json.loads(response.read())
    if body.get("status") != "success":
        raise ClusterError(f"Prometheus {path} failed: {body}")
    return body["data"]


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """An instant query's vector: [{"metric": {...}, "value": [ts, "v"]}, ...]."""
    data = api(url, "/api/v1/query", query=promql)
    result: list[dict[str, Any]] = data["result"]
    return result


def wait_for_series(url: str, promql: str, timeout_s: float = 120) -> list[dict[str, Any]]:
    """Poll until the query returns at least one series (scrapes come every few seconds)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            found = query(url, promql)
        except (OSError, urllib.error.URLError, ClusterError) as exc:
            found, last = [], exc
        if found:
            return found
        time.sleep(1)
    raise ClusterError(f"no series for {promql} after {timeout_s:.0f}s (last error: {last})")
