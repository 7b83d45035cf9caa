"""`tensorwasm selftest`: invoke one Tenant end to end from inside the cluster (the chart's `helm test`).

Owns the command only. It waits for the Tenant to be Ready, reads its Service and token Secret through
the API server with the pod's ServiceAccount, invokes `--function` with a random body over the
Service's ClusterIP and checks the echo. Stdlib only (urllib, ssl): it needs no cluster DNS and no
Kubernetes client. Exit 0 = served and echoed, 1 = the check failed (the reason is printed), 2 = usage.
Must not import the runtime or the operator.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorwasm.api.group import API_VERSION, TENANT
from tensorwasm.api.names import tenant_service_name, token_secret_name

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class SelftestFailed(Exception):
    """The tenant did not serve the check; the message says which step failed."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("selftest", help="invoke a Tenant end to end from inside the cluster")
    parser.add_argument("--tenant", required=True, help="Tenant to invoke (in the pod's namespace)")
    parser.add_argument(
        "--function", default="echo", help="a function that returns its input (default: echo)"
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="seconds to wait for Ready (default: 180)"
    )
    parser.set_defaults(handler=selftest_command)


def selftest_command(args: argparse.Namespace) -> int:
    try:
        api = InClusterApi.from_environment()
        run_selftest(api, args.tenant, args.function, args.timeout)
    except SelftestFailed as exc:
        print(f"selftest: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


class InClusterApi:
    """GET requests to the API server with the pod's ServiceAccount token."""

    def __init__(self, server: str, token: str, namespace: str, context: ssl.SSLContext) -> None:
        self.server, self.token, self.namespace, self.context = server, token, namespace, context

    @classmethod
    def from_environment(cls) -> InClusterApi:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port or not (SERVICE_ACCOUNT / "token").is_file():
            raise SelftestFailed("not in a pod: no KUBERNETES_SERVICE_HOST or ServiceAccount token")
        context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
        return cls(
            f"https://{host}:{port}",
            (SERVICE_ACCOUNT / "token").read_text().strip(),
            (SERVICE_ACCOUNT / "namespace").read_text().strip(),
            context,
        )

    def get(self, path: str) -> dict[str, Any]:
        request = urllib.request.Request(
            self.server + path.format(ns=self.namespace), headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.context) as response:
                body: dict[str, Any] = json.load(response)
                return body
        except urllib.error.HTTPError as exc:
            raise SelftestFailed(f"GET {path.format(ns=self.namespace)}: HTTP {exc.code}") from None
        except OSError as exc:
            raise SelftestFailed(f"GET {path.format(ns=self.namespace)}: {exc}") from None


def run_selftest(
    api: InClusterApi,
    tenant: str,
    function: str,
    timeout_s: float,
    say: Callable[[str], None] = print,
) -> None:
    deadline = time.monotonic() + timeout_s
    tenant_path = f"/apis/{API_VERSION}/namespaces/{{ns}}/{TENANT.plural}/{tenant}"
    obj = wait_ready(api, tenant_path, deadline, say)
    service = api.get(f"/api/v1/namespaces/{{ns}}/services/{tenant_service_name(tenant)}")
    address, port = service["spec"]["clusterIP"], service["spec"]["ports"][0]["port"]
    auth_ref = (obj.get("spec") or {}).get("authSecretRef") or {}
    secret = api.get(f"/api/v1/namespaces/{{ns}}/secrets/{token_secret_name(tenant, auth_ref.get('name'))}")
    token = base64.b64decode(secret["data"]["token"]).decode()
    body = secrets.token_bytes(64)
    url = f"http://{address}:{port}/v1/functions/{function}/invoke"
    reply = invoke_with_retries(url, token, body, deadline, say)
    if reply != body:
        raise SelftestFailed(f"{url} answered {len(reply)} bytes that are not the {len(body)} sent")
    say(f"selftest: OK: tenant {tenant} served {function} through {address}:{port}")


def wait_ready(api: InClusterApi, path: str, deadline: float, say: Callable[[str], None]) -> dict[str, Any]:
    last = ""
    while True:
        obj = api.get(path)
        status = obj.get("status") or {}
        phase = status.get("phase", "")
        if phase == "Ready":
            return obj
        reasons = "; ".join(
            f"{c.get('type')}={c.get('status')} {c.get('reason', '')}: {c.get('message', '')}"
            for c in status.get("conditions") or []
        )
        line = f"selftest: waiting for Ready: phase={phase or '(none)'} {reasons}"
        if line != last:
            say(line)
            last = line
        if time.monotonic() > deadline:
            raise SelftestFailed(f"tenant not Ready in time ({line.removeprefix('selftest: ')})")
        time.sleep(1)


def invoke_with_retries(
    url: str, token: str, body: bytes, deadline: float, say: Callable[[str], None]
) -> bytes:
    """POST once; 429/503 and connection errors are retried after Retry-After (or 1 s) until the deadline."""
    while True:
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                reply: bytes = response.read()
                return reply
        except urllib.error.HTTPError as exc:
            if exc.code not in (429, 503):
                raise SelftestFailed(f"POST {url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None
            wait_s, why = float(exc.headers.get("Retry-After") or 1), f"HTTP {exc.code}"
        except OSError as exc:
            wait_s, why = 1.0, str(exc)
        if time.monotonic() + wait_s > deadline:
            raise SelftestFailed(f"POST {url}: still failing at the deadline ({why})")
        say(f"selftest: retrying in {wait_s:g}s: {why}")
        time.sleep(wait_s)
