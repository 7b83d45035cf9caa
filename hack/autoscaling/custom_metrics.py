"""A custom metrics API (custom.metrics.k8s.io/v1beta2) answering the HPA path's rule from Prometheus.

The dev cluster's stand-in for prometheus-adapter, which this workplace cannot build (the Go module
proxy does not serve sigs.k8s.io/prometheus-adapter) and which is proposed for deprecation
(kubernetes-sigs/prometheus-adapter #701). It answers exactly what docs/helm.md's adapter rule
answers and nothing more: for `GET .../namespaces/NS/pods/*/METRIC?labelSelector=S`, the pods
matching S (listed from the API server) that Prometheus has series of, each with
`sum by (pod) (METRIC{namespace="NS"})` (a pod not scraped yet is left out, as prometheus-adapter
leaves it, and the HPA then assumes the least for it). Only Pods metrics, only the names given
on the command line. It serves TLS with its own certificate (the APIService's caBundle) and takes
requests only from the aggregation layer: a client certificate signed by the request-header CA in
kube-system/extension-apiserver-authentication, with the allowed name. Standard library only (the
tensorwasm image's python3); runs in-cluster with its ServiceAccount.

usage: custom_metrics.py PROMETHEUS_URL METRIC... [--port 6443] [--cert-dir /certs]
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import tempfile
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
GROUP, VERSION = "custom.metrics.k8s.io", "v1beta2"
PREFIX = f"/apis/{GROUP}/{VERSION}"


def kube_get(path: str, **params: str) -> Any:
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    token = (ACCOUNT / "token").read_text().strip()  # re-read: projected tokens rotate
    request = urllib.request.Request(
        f"https://{host}:{port}{path}{query}", headers={"Authorization": f"Bearer {token}"}
    )
    context = ssl.create_default_context(cafile=str(ACCOUNT / "ca.crt"))
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return json.loads(response.read())


def prometheus_by_pod(url: str, metric: str, namespace: str) -> dict[str, float]:
    promql = f'sum by (pod) ({metric}{{namespace="{namespace}"}})'
    with urllib.request.urlopen(
        f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout=10
    ) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise ValueError(f"Prometheus answered {body}")
    return {s["metric"].get("pod", ""): float(s["value"][1]) for s in body["data"]["result"]}


def quantity(value: float) -> str:
    """A Kubernetes quantity: whole numbers as they are, fractions in milli-units."""
    return str(int(value)) if value == int(value) else f"{round(value * 1000)}m"


def build_resource_list(metrics: list[str]) -> dict[str, Any]:
    return {
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{GROUP}/{VERSION}",
        "resources": [{"name": f"pods/{m}", "singularName": "", "namespaced": True, "kind": "MetricValueList",
                       "verbs": ["get"]} for m in metrics],
    }  # fmt: skip


def build_value_list(
    namespace: str, metric: str, values: dict[str, float], pods: list[str]
) -> dict[str, Any]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "kind": "MetricValueList", "apiVersion": f"{GROUP}/{VERSION}", "metadata": {},
        "items": [{
            "describedObject": {"kind": "Pod", "namespace": namespace, "name": pod, "apiVersion": "/v1"},
            "metric": {"name": metric}, "timestamp": now, "value": quantity(values[pod]),
        } for pod in sorted(pods) if pod in values],
    }  # fmt: skip


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}  # fmt: skip


class Handler(BaseHTTPRequestHandler):
    prometheus = ""
    metrics: list[str] = []
    allowed_names: list[str] = []  # requestheader-allowed-names; empty: any name the CA signed

    def from_aggregator(self) -> bool:
        cert = self.connection.getpeercert()  # type: ignore[attr-defined]
        names = [v for rdn in (cert or {}).get("subject", ()) for k, v in rdn if k == "commonName"]
        return not self.allowed_names or any(n in self.allowed_names for n in names)

    def reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if not self.from_aggregator():
            self.reply(403, status(403, "Forbidden", "only the aggregation layer's client certificate"))
            return
        if url.path in ("/healthz", "/readyz", "/livez"):
            self.reply(200, {"status": "ok"})
            return
        if url.path == PREFIX:
            self.reply(200, build_resource_list(self.metrics))
            return
        parts = [urllib.parse.unquote(p) for p in url.path.removeprefix(PREFIX + "/").split("/")]
        # namespaces/NS/pods/*/METRIC
        if len(parts) != 5 or parts[0] != "namespaces" or parts[2] != "pods" or parts[3] != "*":
            self.reply(
                404, status(404, "NotFound", f"only namespaces/NS/pods/*/METRIC is served, not {url.path}")
            )
            return
        namespace, metric = parts[1], parts[4]
        if metric not in self.metrics:
            self.reply(
                404, status(404, "NotFound", f"metric {metric} is not served (serving {self.metrics})")
            )
            return
        selector = urllib.parse.parse_qs(url.query).get("labelSelector", [""])[0]
        try:
            listed = kube_get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector)
            pods = [p["metadata"]["name"] for p in listed["items"]]
            values = prometheus_by_pod(self.prometheus, metric, namespace)
        except (OSError, ValueError, KeyError) as exc:
            self.reply(503, status(503, "ServiceUnavailable", f"backend failed: {exc}"))
            return
        self.reply(200, build_value_list(namespace, metric, values, pods))

    def log_message(self, format: str, *args: Any) -> None:
        print(f"custom-metrics: {self.address_string()} {format % args}", file=sys.stderr, flush=True)


def aggregator_context(cert_dir: Path) -> ssl.SSLContext:
    """Serve our certificate; require the aggregation layer's client certificate."""
    auth = kube_get("/api/v1/namespaces/kube-system/configmaps/extension-apiserver-authentication")["data"]
    Handler.allowed_names = json.loads(auth.get("requestheader-allowed-names") or "[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert_dir / "tls.crt"), str(cert_dir / "tls.key"))
    with tempfile.NamedTemporaryFile("w", suffix=".crt", delete=False) as ca:
        ca.write(auth["requestheader-client-ca-file"])
    context.load_verify_locations(ca.name)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prometheus")
    parser.add_argument("metrics", nargs="+")
    parser.add_argument("--port", type=int, default=6443)
    parser.add_argument("--cert-dir", type=Path, default=Path("/certs"))
    args = parser.parse_args(argv)
    Handler.prometheus, Handler.metrics = args.prometheus.rstrip("/"), args.metrics
    server = ThreadingHTTPServer(("0.0.0.0", args.port), Handler)
    server.socket = aggregator_context(args.cert_dir).wrap_socket(server.socket, server_side=True)
    print(f"custom-metrics: serving {args.metrics} from {args.prometheus} on :{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
