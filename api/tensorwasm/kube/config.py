"""Where the API server is and how to authenticate: in-cluster service account, else a kubeconfig.

Owns `Connection` (server URL, request headers, TLS context) and `load_connection`. Supported:
bearer tokens (inline or tokenFile), client certificates and CAs (inline base64 or files),
insecure-skip-tls-verify. Not supported: exec and auth-provider plugins (a clear error says so).
Reads files only; must not import the operator, the runtime or kopf.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class ConfigError(Exception):
    """No usable credentials were found; the message says where it looked."""


@dataclass(frozen=True)
class Connection:
    server: str
    headers: Mapping[str, str] = field(default_factory=dict)
    ssl: ssl.SSLContext | bool = True  # False: skip verification (insecure-skip-tls-verify)
    token_file: Path | None = None  # read again now and then: projected service-account tokens rotate

    def auth_headers(self) -> dict[str, str]:
        if self.token_file is None:
            return dict(self.headers)
        return {**self.headers, "Authorization": f"Bearer {self.token_file.read_text().strip()}"}


def load_connection(kubeconfig: Path | None = None, env: Mapping[str, str] | None = None) -> Connection:
    """`kubeconfig` when given; else in-cluster; else $KUBECONFIG (first file) or ~/.kube/config."""
    env = os.environ if env is None else env
    if kubeconfig is not None:
        return from_kubeconfig(kubeconfig)
    if in_cluster_available(env):
        return in_cluster(env)
    path = (
        Path(env["KUBECONFIG"].split(os.pathsep)[0])
        if env.get("KUBECONFIG")
        else Path.home() / ".kube/config"
    )
    if not path.is_file():
        raise ConfigError(f"no in-cluster service account and no kubeconfig at {path}")
    return from_kubeconfig(path)


def in_cluster_available(env: Mapping[str, str]) -> bool:
    """In a pod with a ServiceAccount token (what client-go's InClusterConfig asks for)."""
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT / "token").is_file()


def in_cluster(env: Mapping[str, str]) -> Connection:
    host, port = env["KUBERNETES_SERVICE_HOST"], env.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{host}]" if ":" in host else host  # IPv6 service address
    ctx = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
    return Connection(f"https://{host}:{port}", {}, ctx, token_file=SERVICE_ACCOUNT / "token")


def from_kubeconfig(path: Path) -> Connection:
    """The current context of a kubeconfig file; relative file paths resolve against its folder."""
    doc: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    ctx_name = doc.get("current-context")
    context = _named(doc, "contexts", ctx_name, path)["context"]
    cluster = _named(doc, "clusters", context.get("cluster"), path)["cluster"]
    user = _named(doc, "users", context.get("user"), path).get("user") or {}
    if "exec" in user or "auth-provider" in user:
        raise ConfigError(
            f"{path}: exec and auth-provider credentials are not supported; use a token or cert"
        )
    base = path.parent
    headers: dict[str, str] = {}
    token_file = base / user["tokenFile"] if user.get("tokenFile") else None
    if user.get("token"):
        headers["Authorization"] = f"Bearer {user['token']}"
    elif user.get("username"):
        basic = base64.b64encode(f"{user['username']}:{user.get('password', '')}".encode()).decode()
        headers["Authorization"] = f"Basic {basic}"
    server = str(cluster["server"]).rstrip("/")
    if cluster.get("insecure-skip-tls-verify") or not server.startswith("https"):
        return Connection(server, headers, False, token_file)
    ctx = ssl.create_default_context()
    ca = _blob(base, cluster, "certificate-authority")
    if ca:
        ctx.load_verify_locations(cadata=ca.decode())
    cert, key = _blob(base, user, "client-certificate"), _blob(base, user, "client-key")
    if cert and key:
        _load_chain(ctx, cert, key)
    return Connection(server, headers, ctx, token_file)


def _named(doc: Mapping[str, Any], section: str, name: object, path: Path) -> dict[str, Any]:
    for entry in doc.get(section) or []:
        if entry.get("name") == name:
            return dict(entry)
    raise ConfigError(f"{path}: no {section[:-1]} named {name!r} (current-context)")


def _read(base: Path, name: str) -> bytes:
    return (base / name).read_bytes()


def _blob(base: Path, section: Mapping[str, Any], key: str) -> bytes | None:
    """`<key>-data` (base64) or `<key>` (a file)."""
    if section.get(f"{key}-data"):
        return base64.b64decode(section[f"{key}-data"])
    return _read(base, section[key]) if section.get(key) else None


def _load_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    # ssl loads a client certificate only from files: write both to private temp files, load, remove.
    paths = []
    try:
        for blob in (cert, key):
            fd, name = tempfile.mkstemp(prefix="tw-kube-")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            paths.append(name)
        ctx.load_cert_chain(paths[0], paths[1])
    finally:
        for name in paths:
            os.unlink(name)
