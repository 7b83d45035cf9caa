"""The two autoscaler paths of the chart, running for real on the dev cluster's real node.

Owns:
- **KEDA** (`autoscaling.provider: keda`): its operator and metrics API server built from KEDA's Go
  module (`hack/controlplane/build.sh keda`), one image holding both static binaries (one layer written
  by hack/image/ociarchive.py), and KEDA's own manifests (`kubectl kustomize config/minimal` from the
  same module: CRDs, RBAC, Deployments, Services, the `v1beta1.external.metrics.k8s.io` APIService)
  with the dev cluster's changes: the local image, the real node's selector and toleration, the
  operator's gRPC address as an IP (the dev cluster runs no DNS), no webhook patching (the admission
  webhooks are not installed). KEDA's operator writes the certificates itself and patches the
  APIService's caBundle, so the API server reaches the metrics server with verified TLS.
- **The HPA path** (`autoscaling.provider: hpa`): a custom metrics API (custom.metrics.k8s.io/v1beta2)
  answering docs/helm.md's prometheus-adapter rule from the dev Prometheus
  (hack/autoscaling/custom_metrics.py, the tensorwasm image's python3), with a certificate made here
  and the APIService's caBundle set to it. prometheus-adapter itself is not served by the Go module
  proxy here; the stand-in serves the same metric under the same name.
Both register as real APIServices that the kube-apiserver's aggregation layer reaches (with the
front-proxy client certificate dev/cluster.py gives it). Used by `tensorwasm dev autoscaler` and
tests/cluster/test_autoscalers.py. Must not import the runtime or the operator.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tensorwasm.dev.cluster import BUILD_SCRIPT, REPO_ROOT, ClusterError, ClusterState, LocalControlPlane
from tensorwasm.dev.node import REAL_NODE_LABEL
from tensorwasm.dev.prometheus import IMAGES, OCIARCHIVE

KEDA_NAMESPACE = "keda"
KEDA_APISERVICE = "v1beta1.external.metrics.k8s.io"
CUSTOM_METRICS_NAMESPACE = "tensorwasm-autoscaling"
CUSTOM_METRICS_APISERVICE = "v1beta2.custom.metrics.k8s.io"
CUSTOM_METRICS_NAME = "custom-metrics"
CUSTOM_METRICS_SCRIPT = REPO_ROOT / "hack" / "autoscaling" / "custom_metrics.py"
SERVED_METRICS = ("tensorwasm_queue_depth",)  # the chart's autoscaling.metricName
UID = 65534
ON_REAL_NODE = {
    "nodeSelector": {REAL_NODE_LABEL: "true"},
    "tolerations": [{"key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
}


def build_keda(log: Callable[[str], None] = print) -> Path:
    """`build.sh keda` (cached by version): the directory with keda, keda-adapter and ../config."""
    override = os.environ.get("TENSORWASM_KEDA_BIN")
    if override:
        return Path(override)
    log("Building or reusing KEDA (hack/controlplane/build.sh keda; a cold build takes over an hour)")
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "keda"], stdout=subprocess.PIPE, stderr=sys.stderr, text=True, check=False
    )
    if proc.returncode != 0:
        raise ClusterError(f"hack/controlplane/build.sh keda failed with exit code {proc.returncode}")
    return Path(proc.stdout.strip().splitlines()[-1])


def keda_built() -> Path | None:
    """KEDA's bin directory when `build.sh keda` has built this version (and trim) already, else None."""
    if os.environ.get("TENSORWASM_KEDA_BIN"):
        return Path(os.environ["TENSORWASM_KEDA_BIN"])
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "keda-cached"], capture_output=True, text=True, check=False
    )
    return Path(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None


def build_keda_image(bin_dir: Path, log: Callable[[str], None] = print) -> tuple[str, Path]:
    """One image with /keda and /keda-adapter (static: nothing else in it), tagged by their digest."""
    digest = hashlib.sha256()
    for name in ("keda", "keda-adapter"):
        digest.update((bin_dir / name).read_bytes())
    tag = digest.hexdigest()[:12]
    ref, archive = f"tensorwasm.io/keda:{tag}", IMAGES / f"keda-{tag}.oci.tar"
    if archive.exists():
        return ref, archive
    IMAGES.mkdir(parents=True, exist_ok=True)
    layer = archive.with_suffix(".layer.tar")
    with tarfile.open(layer, "w") as tar:
        for name in ("keda", "keda-adapter"):
            tar.add(bin_dir / name, arcname=name)
        info = tarfile.TarInfo("tmp")
        info.type, info.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(info)
    subprocess.run(
        [sys.executable, str(OCIARCHIVE), "--name", ref, "--layer", str(layer), "--user", str(UID),
         "--out", str(archive)],
        check=True, capture_output=True,
    )  # fmt: skip
    layer.unlink()
    log(f"Built {ref} ({archive})")
    return ref, archive


def adapt_keda_manifests(
    docs: Sequence[dict[str, Any]], image: str, operator_ip: str
) -> list[dict[str, Any]]:
    """KEDA's kustomize output for the dev cluster (the module docstring's changes), else as KEDA ships it."""
    out = []
    for doc in docs:
        doc = json.loads(json.dumps(doc))
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            spec.update(json.loads(json.dumps(ON_REAL_NODE)))
            spec["securityContext"] = {**spec.get("securityContext", {}), "runAsUser": UID, "runAsGroup": UID,
                                       "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
            for c in spec["containers"]:
                c["image"], c["imagePullPolicy"] = image, "Never"
                c["resources"] = {
                    "requests": {"cpu": "20m", "memory": "64Mi"},
                    "limits": {"memory": "1000Mi"},
                }
                if doc["metadata"]["name"] == "keda-operator":
                    c["args"] = [*c.get("args", []), "--enable-webhook-patching=false"]
                else:
                    c["args"] = [
                        *c.get("args", []),
                        f"--metrics-service-address={operator_ip}:9666",
                        f"--metrics-service-grpc-authority=keda-operator.{KEDA_NAMESPACE}.svc.cluster.local",
                    ]
        out.append(doc)
    return out


def serving_certificate(service: str, namespace: str) -> tuple[str, str, str]:
    """A CA and a serving certificate for the Service's DNS names: (ca.crt, tls.crt, tls.key) as PEM."""
    names = [f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        run = subprocess.run
        run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-keyout",
             str(d / "ca.key"), "-out", str(d / "ca.crt"), "-subj", f"/CN={service}-ca"],
            check=True, capture_output=True)  # fmt: skip
        run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "tls.key"),
             "-out", str(d / "tls.csr"), "-subj", f"/CN={names[0]}"],
            check=True, capture_output=True)  # fmt: skip
        (d / "ext").write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n")
        run(["openssl", "x509", "-req", "-in", str(d / "tls.csr"), "-CA", str(d / "ca.crt"), "-CAkey",
             str(d / "ca.key"), "-CAcreateserial", "-days", "3650", "-out", str(d / "tls.crt"),
             "-extfile", str(d / "ext")], check=True, capture_output=True)  # fmt: skip
        return (d / "ca.crt").read_text(), (d / "tls.crt").read_text(), (d / "tls.key").read_text()


def build_custom_metrics_objects(
    prometheus_url: str, image: str, script: str, cert: tuple[str, str, str],
    namespace: str = CUSTOM_METRICS_NAMESPACE, metrics: Sequence[str] = SERVED_METRICS,
) -> list[dict[str, Any]]:  # fmt: skip
    """Everything the HPA path's metrics API needs, in apply order (the APIService last)."""
    name, ca, crt, key = CUSTOM_METRICS_NAME, *cert
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "tensorwasm-dev"}
    meta = {"name": name, "namespace": namespace, "labels": labels}
    cluster_meta = {"name": f"tensorwasm-dev:{name}", "labels": labels}
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]
    pod = {
        "serviceAccountName": name, **json.loads(json.dumps(ON_REAL_NODE)),
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": name, "image": image, "imagePullPolicy": "IfNotPresent",
            "command": ["python3", "/etc/custom-metrics/custom_metrics.py", prometheus_url, *metrics,
                        "--port", "6443", "--cert-dir", "/certs"],
            "ports": [{"name": "https", "containerPort": 6443}],
            # TCP: the server takes only the aggregation layer's client certificate, not the kubelet's.
            "readinessProbe": {"tcpSocket": {"port": 6443}, "periodSeconds": 2},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
            "volumeMounts": [{"name": "script", "mountPath": "/etc/custom-metrics"},
                             {"name": "certs", "mountPath": "/certs", "readOnly": True},
                             {"name": "tmp", "mountPath": "/tmp"}],
        }],
        "volumes": [{"name": "script", "configMap": {"name": name}},
                    {"name": "certs", "secret": {"secretName": f"{name}-certs"}},
                    {"name": "tmp", "emptyDir": {}}],
    }  # fmt: skip
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": cluster_meta,
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": cluster_meta,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": cluster_meta["name"]},
         "subjects": subject},
        # The request-header CA it trusts for the aggregation layer's client certificate.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": f"tensorwasm-dev:{name}", "namespace": "kube-system", "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": "extension-apiserver-authentication-reader"},
         "subjects": subject},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {**meta, "name": f"{name}-certs"},
         "type": "kubernetes.io/tls", "data": {"tls.crt": _b64(crt), "tls.key": _b64(key)}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"custom_metrics.py": script}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {
            "replicas": 1, "selector": {"matchLabels": labels}, "strategy": {"type": "Recreate"},
            "template": {"metadata": {"labels": labels, "annotations": {
                "tensorwasm.io/config-sha256": hashlib.sha256((script + crt).encode()).hexdigest()}},
                "spec": pod}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {
            "selector": labels, "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}},
        {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
         "metadata": {"name": CUSTOM_METRICS_APISERVICE, "labels": labels},
         "spec": {"group": "custom.metrics.k8s.io", "version": "v1beta2", "groupPriorityMinimum": 100,
                  "versionPriority": 200, "caBundle": _b64(ca),
                  "service": {"name": name, "namespace": namespace, "port": 443}}},
    ]  # fmt: skip


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class DevAutoscalers:
    """KEDA and the HPA path's metrics API on a recorded dev cluster with a real node."""

    def __init__(
        self, plane: LocalControlPlane, state: ClusterState, log: Callable[[str], None] = print
    ) -> None:
        if state.node_slot is None:
            raise ClusterError(
                "the autoscalers run on the real node: start the cluster without --no-real-node"
            )
        self.plane, self.state, self.log = plane, state, log

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        return self.plane.kubectl(self.state, *args, input_text=input_text, check=check)

    def apply(self, items: Sequence[dict[str, Any]]) -> None:
        self.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-",
            input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(items)}),
        )  # fmt: skip

    def keda_up(self, timeout_s: float = 300) -> None:
        """Build (cached), import, apply KEDA's manifests; wait until external.metrics.k8s.io is Available."""
        bin_dir = build_keda(self.log)
        ref, archive = build_keda_image(bin_dir, self.log)
        self.plane.import_image(self.state, archive)
        rendered = self.kubectl("kustomize", str(bin_dir.parent / "config" / "minimal"))
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        # CRDs, the namespace and the Services first: the adapter needs the operator Service's IP.
        first = [d for d in docs if d["kind"] in ("CustomResourceDefinition", "Namespace", "Service")]
        self.apply(first)
        operator_ip = self.kubectl(
            "get", "service", "keda-operator", "-n", KEDA_NAMESPACE, "-o", "jsonpath={.spec.clusterIP}"
        ).strip()
        self.apply(adapt_keda_manifests(docs, ref, operator_ip))
        for deployment in ("keda-operator", "keda-metrics-apiserver"):
            self.kubectl("rollout", "status", f"deployment/{deployment}", "-n", KEDA_NAMESPACE,
                         f"--timeout={int(timeout_s)}s")  # fmt: skip
        self.wait_available(KEDA_APISERVICE, timeout_s)
        self.log(f"KEDA {ref} serving {KEDA_APISERVICE}")

    def keda_down(self) -> None:
        self.kubectl("delete", "apiservice", KEDA_APISERVICE, "--ignore-not-found", check=False)
        self.kubectl(
            "delete", "namespace", KEDA_NAMESPACE, "--ignore-not-found", "--timeout=120s", check=False
        )

    def custom_metrics_up(self, prometheus_url: str, image: str, timeout_s: float = 180) -> None:
        """The HPA path's custom.metrics.k8s.io, reading `prometheus_url`; `image` needs python3."""
        cert = serving_certificate(CUSTOM_METRICS_NAME, CUSTOM_METRICS_NAMESPACE)
        self.apply(
            build_custom_metrics_objects(prometheus_url, image, CUSTOM_METRICS_SCRIPT.read_text(), cert)
        )
        self.kubectl("rollout", "status", f"deployment/{CUSTOM_METRICS_NAME}", "-n", CUSTOM_METRICS_NAMESPACE,
                     f"--timeout={int(timeout_s)}s")  # fmt: skip
        self.wait_available(CUSTOM_METRICS_APISERVICE, timeout_s)
        self.log(f"custom.metrics.k8s.io served from {prometheus_url}")

    def custom_metrics_down(self) -> None:
        self.kubectl("delete", "apiservice", CUSTOM_METRICS_APISERVICE, "--ignore-not-found", check=False)
        self.kubectl("delete", "clusterrole,clusterrolebinding", f"tensorwasm-dev:{CUSTOM_METRICS_NAME}",
                     "--ignore-not-found", check=False)  # fmt: skip
        self.kubectl("delete", "rolebinding", f"tensorwasm-dev:{CUSTOM_METRICS_NAME}", "-n", "kube-system",
                     "--ignore-not-found", check=False)  # fmt: skip
        self.kubectl("delete", "namespace", CUSTOM_METRICS_NAMESPACE, "--ignore-not-found", "--timeout=120s",
                     check=False)  # fmt: skip

    def wait_available(self, apiservice: str, timeout_s: float) -> None:
        """Until the aggregation layer has reached the server (its Available condition is True)."""
        deadline, last = time.monotonic() + timeout_s, ""
        while time.monotonic() < deadline:
            obj = json.loads(self.kubectl("get", "apiservice", apiservice, "-o", "json"))
            for c in obj.get("status", {}).get("conditions", []):
                if c["type"] == "Available":
                    if c["status"] == "True":
                        return
                    last = f"{c.get('reason')}: {c.get('message')}"
            time.sleep(1)
        raise ClusterError(f"APIService {apiservice} not Available after {timeout_s:.0f}s ({last})")


# --- driving and watching a scale cycle (tests, bench/bench_autoscaling.py) ---


class QueueLoad:
    """Keeps `concurrency` invokes in flight against one shard address until stopped or `max_s` passed.

    Bounded in time and count (at most `max_requests`), to the cluster's own addresses only; every
    status is counted (0 = the connection failed), with how many answers carried Retry-After.
    """

    def __init__(
        self, url: str, function: str, token: str, concurrency: int, max_s: float = 300,
        max_requests: int = 10_000,
    ) -> None:  # fmt: skip
        self.url, self.function, self.token = url, function, token
        self.concurrency, self.max_s, self.max_requests = concurrency, max_s, max_requests
        self.statuses: dict[int, int] = {}
        self.retry_after = 0
        self.sent = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.started_at = 0.0

    def start(self) -> QueueLoad:
        self.started_at = time.monotonic()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.concurrency)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> dict[int, int]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
        return dict(self.statuses)

    def _run(self) -> None:
        deadline = self.started_at + self.max_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                if self.sent >= self.max_requests:
                    return
                self.sent += 1
            status, retry = invoke(self.url, self.function, self.token)
            with self._lock:
                self.statuses[status] = self.statuses.get(status, 0) + 1
                self.retry_after += retry is not None
            if status == 429:
                self._stop.wait(0.2)  # a refused invoke is answered at once: do not spin on it


def invoke(url: str, function: str, token: str, body: bytes = b"x") -> tuple[int, str | None]:
    """Status and Retry-After of one invoke (0: no HTTP answer)."""
    request = urllib.request.Request(
        f"{url}/v1/functions/{function}/invoke", data=body, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status), response.headers.get("Retry-After")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.headers.get("Retry-After")
    except OSError:
        return 0, None


def hpa_state(kubectl: Callable[..., str], namespace: str, name: str) -> tuple[int, float | None]:
    """The HPA's status.desiredReplicas and the first metric value it reports (None before one)."""
    hpa = json.loads(kubectl("get", "hpa", name, "-n", namespace, "-o", "json", check=False) or "{}")
    status = hpa.get("status", {})
    value: float | None = None
    for metric in status.get("currentMetrics") or ():
        current = (metric.get("pods") or metric.get("external") or {}).get("current", {})
        raw = current.get("averageValue") or current.get("value")
        if raw is not None:
            value = parse_quantity(raw)
            break
    return int(status.get("desiredReplicas") or 0), value


def statefulset_replicas(kubectl: Callable[..., str], namespace: str, name: str) -> int:
    return int(kubectl("get", "statefulset", name, "-n", namespace, "-o", "jsonpath={.spec.replicas}") or 0)


def parse_quantity(raw: str) -> float:
    """Enough of Kubernetes quantities for metric values: plain numbers and milli-units."""
    return float(raw[:-1]) / 1000 if raw.endswith("m") else float(raw)
