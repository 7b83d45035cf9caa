"""Checks before the operator starts watching: credentials, the API server, the CRDs, RBAC.

Owns the one-line verdicts of an operator that cannot work (exit 1 at once, not a retry loop):
a kubeconfig that does not load, an API server not reached within STARTUP_TIMEOUT, credentials
refused (401), the Tenant/Snapshot CRDs not served (still missing at the deadline: `helm install`
applies them a moment before the operator starts), no right to list Tenants where it watches.
Must not import kopf.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence

import aiohttp

from tensorwasm.api.group import API_VERSION, SNAPSHOT, TENANT
from tensorwasm.kube.client import KubeApi, KubeError, resource_path
from tensorwasm.kube.config import Connection, load_connection
from tensorwasm.operator.settings import FIELD_MANAGER

ATTEMPT_TIMEOUT_S = 5.0
RETRY_S = 1.0


class StartupError(Exception):
    """The operator cannot work with this configuration; the message is the one line to print."""


def connection() -> Connection:
    """The connection kopf's login will use too (in-cluster, else $KUBECONFIG, else ~/.kube/config)."""
    try:
        return load_connection()
    except Exception as exc:  # yaml, missing keys, unreadable files, bad certificates: all one verdict
        one_line = " ".join(str(exc).split())  # YAML errors span lines
        raise StartupError(f"cannot load Kubernetes credentials: {one_line}") from None


async def preflight(namespaces: Sequence[str] | None, timeout_s: float) -> None:
    """Raise StartupError unless the API server serves our CRDs and lets us list Tenants.

    `namespaces`: those watched (None: all). Transient failures (refused, timed out, 5xx, CRDs not
    yet served) are retried until `timeout_s`; refused credentials fail at once.
    """
    conn = connection()
    api = KubeApi(conn, FIELD_MANAGER)
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    try:
        while True:
            try:
                async with asyncio.timeout(ATTEMPT_TIMEOUT_S):
                    await _check(api, namespaces)
                return
            except KubeError as exc:
                if exc.status in (401, 403):
                    raise StartupError(_refused(exc, conn.server)) from None
                last = _missing_crds() if exc.status == 404 else f"the API server answered {exc}"
            except (aiohttp.ClientConnectorCertificateError, ssl.SSLError) as exc:
                raise StartupError(f"TLS with the API server at {conn.server} failed: {exc}") from None
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = f"cannot reach the API server at {conn.server}: {_reason(exc)}"
            if time.monotonic() + RETRY_S > deadline:
                limit = f"gave up after {timeout_s:g} s: TENSORWASM_OPERATOR_STARTUP_TIMEOUT"
                raise StartupError(f"{last} ({limit})")
            await asyncio.sleep(RETRY_S)
    finally:
        await api.close()


async def _check(api: KubeApi, namespaces: Sequence[str] | None) -> None:
    served = await api.get(f"/apis/{API_VERSION}")
    if served is None:
        raise KubeError(404, "NotFound", f"/apis/{API_VERSION}")
    names = {r.get("name") for r in served.get("resources") or []}
    if not {TENANT.plural, SNAPSHOT.plural} <= names:
        raise KubeError(404, "NotFound", f"/apis/{API_VERSION} lacks {TENANT.plural} or {SNAPSHOT.plural}")
    for ns in namespaces if namespaces is not None else [None]:
        await api.list_versioned(resource_path(API_VERSION, TENANT.plural, ns), {"limit": "1"})


def _missing_crds() -> str:
    return (
        f"the {TENANT.kind} and {SNAPSHOT.kind} CRDs ({API_VERSION}) are not installed: "
        "kubectl apply -f crds/ (or helm install with crds.enabled=true)"
    )


def _refused(exc: KubeError, server: str) -> str:
    if exc.status == 401:
        return f"the API server at {server} refused the credentials (401 Unauthorized): check the kubeconfig"
    return f"the API server refused a needed read ({exc}): grant it in the operator's RBAC (rbac.create)"


def lease_refused(exc: KubeError, namespace: str, name: str) -> str:
    """The one line for a leader Lease the operator may not read or write (not worth retrying)."""
    return (
        f"the API server refused the leader Lease {namespace}/{name} ({exc}): grant get, create and "
        f"patch on leases.coordination.k8s.io named {name} in the operator's Role (rbac.create), "
        "or turn leader election off"
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {ATTEMPT_TIMEOUT_S:g} s"
    return str(exc) or type(exc).__name__
