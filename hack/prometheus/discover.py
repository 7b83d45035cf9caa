"""Kubernetes discovery of shard pods for a Prometheus that lacks it, written as Prometheus file_sd targets.

Debian's prometheus is built without kubernetes_sd_configs, so the dev cluster's Prometheus pod runs
this beside it (python3 of the tensorwasm image, standard library only): every few seconds it lists
the EndpointSlices of the Services that match a label selector, in the given namespaces, and writes
one target per endpoint address on the named port, labelled as prometheus-operator labels a
ServiceMonitor's targets (job = Service name, namespace, service, pod, endpoint). The file is
replaced atomically; Prometheus re-reads it on change. Runs in-cluster with its ServiceAccount.

usage: discover.py OUT.json SELECTOR PORT_NAME NAMESPACE... [--interval S]
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def targets_from_slices(slices: list[dict[str, Any]], port_name: str) -> list[dict[str, Any]]:
    """file_sd entries for each slice's endpoints on `port_name` (not-ready ones too: `up` tells)."""
    groups = []
    for s in slices:
        service = s["metadata"].get("labels", {}).get("kubernetes.io/service-name", "")
        ports = [p["port"] for p in s.get("ports") or () if p.get("name") == port_name]
        for port in ports:
            for endpoint in s.get("endpoints") or ():
                ref = endpoint.get("targetRef") or {}
                for address in endpoint.get("addresses", ())[:1]:
                    host = f"[{address}]" if ":" in address else address
                    labels = {
                        "job": service, "namespace": s["metadata"]["namespace"], "service": service,
                        "endpoint": port_name, "pod": ref.get("name", "") if ref.get("kind") == "Pod" else "",
                    }  # fmt: skip
                    groups.append({"targets": [f"{host}:{port}"], "labels": labels})
    return sorted(groups, key=lambda g: g["targets"][0])


def list_slices(namespace: str, selector: str) -> list[dict[str, Any]]:
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
    query = urllib.parse.urlencode({"labelSelector": selector})
    url = f"https://{host}:{port}/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices?{query}"
    token = (ACCOUNT / "token").read_text().strip()  # re-read: projected tokens rotate
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    context = ssl.create_default_context(cafile=str(ACCOUNT / "ca.crt"))
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        items: list[dict[str, Any]] = json.loads(response.read())["items"]
    for item in items:
        item["metadata"].setdefault("namespace", namespace)
    return items


def write_atomically(path: Path, groups: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("selector")
    parser.add_argument("port_name")
    parser.add_argument("namespaces", nargs="+")
    parser.add_argument("--interval", type=float, default=5.0)
    args = parser.parse_args(argv)
    written = None
    while True:
        try:
            groups = [
                g
                for ns in args.namespaces
                for g in targets_from_slices(list_slices(ns, args.selector), args.port_name)
            ]
        except (OSError, ValueError, KeyError) as exc:  # the API server restarting, a token rotating
            print(f"discover: listing failed, keeping the last targets: {exc}", file=sys.stderr, flush=True)
        else:
            if groups != written:
                write_atomically(args.out, groups)
                print(f"discover: {len(groups)} targets: {[g['targets'][0] for g in groups]}", flush=True)
                written = groups
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
