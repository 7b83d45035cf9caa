"""One tenant's configuration as the shard sees it, parsed from either tenant source.

Owns `TenantConfig` (frozen, comparable: the shard diffs old against new to decide what to reload),
Kubernetes-style quantity parsing ("64Mi") and the two parsers: a local tenants-file entry and a
Tenant resource whose module bytes, token and PTX the Kubernetes source has already resolved.
Every bad input raises `TenantConfigError` naming the offending field.
Pure: no I/O beyond reading a `tokenFile` named by the local file. Must not import wasmtime, cuda,
aiohttp or kubernetes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorwasm.quantity import quantity_bytes

KIB = 1024
MIB = 1024 * KIB

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Tenant names appear in URLs and metric labels: DNS-1123 labels, like Kubernetes object names.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_FUNCTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")


class TenantConfigError(ValueError):
    """A tenant's configuration is invalid; the message names the field."""

    reason = "InvalidSpec"


@dataclass(frozen=True)
class ModuleSource:
    """Where a tenant's wasm module comes from; exactly one of path, url or data is set."""

    sha256: str
    path: Path | None = None
    url: str | None = None
    data: bytes | None = field(default=None, repr=False)  # resolved from a ConfigMap by the source
    origin: str = ""  # human-readable origin for messages, e.g. "configmap default/echo key module.wasm"

    def describe(self) -> str:
        if self.origin:
            return self.origin
        if self.path is not None:
            return f"file {self.path}"
        return f"url {self.url}" if self.url else "inline data"


@dataclass(frozen=True)
class TenantLimits:
    """Per-tenant limits with the defaults of the Tenant resource."""

    gpu_memory_bytes: int | None = None  # None: accounting only
    linear_memory_bytes: int = 64 * MIB
    timeout_ms: int = 1000
    max_concurrency: int = 4
    queue_length: int = 64
    max_body_bytes: int = 1 * MIB


@dataclass(frozen=True)
class TenantConfig:
    """Everything the shard needs to serve one tenant; equal configs need no reload."""

    name: str
    token: str = field(repr=False)
    module: ModuleSource
    functions: tuple[str, ...] = ()  # empty: every function the module exports
    limits: TenantLimits = TenantLimits()
    sm_percent: int | None = None
    kernels: tuple[tuple[str, str], ...] = ()  # (kernel name, PTX text)
    namespace: str = ""
    generation: int = 0
    uid: str = ""  # Kubernetes metadata.uid: a re-created Tenant is a new tenant (fresh state, own snapshots)

    def same_code(self, other: TenantConfig) -> bool:
        """True when only the token or the function list differ, so no reload is needed."""
        return (
            self.uid == other.uid
            and self.module == other.module
            and self.limits == other.limits
            and self.sm_percent == other.sm_percent
            and self.kernels == other.kernels
        )


def parse_quantity(value: object, where: str) -> int:
    """Parse a byte quantity: an integer or a Kubernetes quantity string like "64Mi" or "1.5Gi"."""
    try:
        return quantity_bytes(value)
    except ValueError as exc:
        raise TenantConfigError(f"{where}: {exc}") from None


def parse_local_tenant(entry: object, where: str, base_dir: Path) -> TenantConfig:
    """Parse one entry of a local tenants file; relative paths resolve against `base_dir`."""
    raw = _mapping(entry, where)
    _reject_unknown(
        raw, where, {"name", "token", "tokenFile", "module", "functions", "limits", "gpu", "kernels"}
    )
    name = _name(raw.get("name"), f"{where}.name")
    token = _local_token(raw, where, base_dir)
    module_raw = _mapping(raw.get("module"), f"{where}.module")
    _reject_unknown(module_raw, f"{where}.module", {"path", "url", "sha256"})
    sha = _sha256(module_raw.get("sha256"), f"{where}.module.sha256")
    has_path, has_url = "path" in module_raw, "url" in module_raw
    if has_path == has_url:
        raise TenantConfigError(f"{where}.module: set exactly one of path or url")
    if has_path:
        rel = Path(_string(module_raw["path"], f"{where}.module.path"))
        module = ModuleSource(sha256=sha, path=rel if rel.is_absolute() else base_dir / rel)
    else:
        module = ModuleSource(sha256=sha, url=_url(module_raw["url"], f"{where}.module.url"))
    kernels = []
    for i, k in enumerate(_list(raw.get("kernels", []), f"{where}.kernels")):
        kw = f"{where}.kernels[{i}]"
        km = _mapping(k, kw)
        _reject_unknown(km, kw, {"name", "path"})
        kpath = Path(_string(km.get("path"), f"{kw}.path"))
        kpath = kpath if kpath.is_absolute() else base_dir / kpath
        try:
            ptx = kpath.read_text()
        except OSError as exc:
            raise TenantConfigError(f"{kw}.path: cannot read {kpath}: {exc.strerror}") from exc
        kernels.append((_function(km.get("name"), f"{kw}.name"), ptx))
    return TenantConfig(
        name=name,
        token=token,
        module=module,
        functions=_functions(raw.get("functions"), f"{where}.functions"),
        limits=parse_limits(raw.get("limits"), f"{where}.limits"),
        sm_percent=_sm_percent(raw.get("gpu"), f"{where}.gpu"),
        kernels=tuple(kernels),
    )


def parse_kube_tenant(
    obj: Mapping[str, Any],
    *,
    token: str,
    module_data: bytes | None,
    module_origin: str = "",
    kernels: tuple[tuple[str, str], ...] = (),
) -> TenantConfig:
    """Parse a Tenant whose token, module bytes (configMapRef) and PTX the source has resolved."""
    meta = _mapping(obj.get("metadata"), "metadata")
    spec = _mapping(obj.get("spec"), "spec")
    module_raw = _mapping(spec.get("module"), "spec.module")
    sha = _sha256(module_raw.get("sha256"), "spec.module.sha256")
    has_cm, has_url = "configMapRef" in module_raw, "url" in module_raw
    if has_cm == has_url:
        raise TenantConfigError("spec.module: set exactly one of configMapRef or url")
    if has_cm:
        if module_data is None:
            raise TenantConfigError("spec.module.configMapRef: module data was not resolved")
        module = ModuleSource(sha256=sha, data=module_data, origin=module_origin)
    else:
        module = ModuleSource(sha256=sha, url=_url(module_raw["url"], "spec.module.url"))
    if not token:
        raise TenantConfigError("spec.authSecretRef: the token Secret has an empty 'token' key")
    generation = meta.get("generation", 0)
    return TenantConfig(
        name=_name(meta.get("name"), "metadata.name"),
        token=token,
        module=module,
        functions=_functions(spec.get("functions"), "spec.functions"),
        limits=parse_limits(spec.get("limits"), "spec.limits"),
        sm_percent=_sm_percent(spec.get("gpu"), "spec.gpu"),
        kernels=kernels,
        namespace=str(meta.get("namespace", "")),
        generation=generation if isinstance(generation, int) else 0,
        uid=str(meta.get("uid", "")),
    )


def parse_limits(raw: object, where: str) -> TenantLimits:
    """Parse a `limits` mapping (absent = all defaults)."""
    if raw is None:
        return TenantLimits()
    m = _mapping(raw, where)
    _reject_unknown(
        m,
        where,
        {"gpuMemory", "linearMemory", "timeoutMs", "maxConcurrency", "queueLength", "maxBodyBytes"},
    )
    d = TenantLimits()
    gpu = m.get("gpuMemory")
    limits = TenantLimits(
        gpu_memory_bytes=None if gpu is None else parse_quantity(gpu, f"{where}.gpuMemory"),
        linear_memory_bytes=_quantity_in(m, "linearMemory", where, d.linear_memory_bytes, 64 * KIB, 4 << 30),
        timeout_ms=_int_in(m, "timeoutMs", where, d.timeout_ms, 1, 3_600_000),
        max_concurrency=_int_in(m, "maxConcurrency", where, d.max_concurrency, 1, 1024),
        queue_length=_int_in(m, "queueLength", where, d.queue_length, 0, 1_000_000),
        max_body_bytes=_quantity_in(m, "maxBodyBytes", where, d.max_body_bytes, 0, 1 << 30),
    )
    if limits.gpu_memory_bytes == 0:
        raise TenantConfigError(f"{where}.gpuMemory: must be positive (omit it for accounting only)")
    return limits


def _quantity_in(m: Mapping[str, Any], key: str, where: str, default: int, lo: int, hi: int) -> int:
    if key not in m:
        return default
    value = parse_quantity(m[key], f"{where}.{key}")
    if not lo <= value <= hi:
        raise TenantConfigError(f"{where}.{key}: {m[key]!r} is outside [{lo}, {hi}] bytes")
    return value


def _int_in(m: Mapping[str, Any], key: str, where: str, default: int, lo: int, hi: int) -> int:
    if key not in m:
        return default
    value = m[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TenantConfigError(f"{where}.{key}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise TenantConfigError(f"{where}.{key}: {value} is outside [{lo}, {hi}]")
    return value


def _local_token(raw: Mapping[str, Any], where: str, base_dir: Path) -> str:
    if ("token" in raw) == ("tokenFile" in raw):
        raise TenantConfigError(f"{where}: set exactly one of token or tokenFile")
    if "token" in raw:
        token = _string(raw["token"], f"{where}.token")
    else:
        path = Path(_string(raw["tokenFile"], f"{where}.tokenFile"))
        path = path if path.is_absolute() else base_dir / path
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise TenantConfigError(f"{where}.tokenFile: cannot read {path}: {exc.strerror}") from exc
    if len(token) < 8 or any(c.isspace() for c in token):
        raise TenantConfigError(f"{where}: a token needs at least 8 characters and no whitespace")
    return token


def _sm_percent(raw: object, where: str) -> int | None:
    if raw is None:
        return None
    m = _mapping(raw, where)
    if "smPercent" not in m:
        return None
    return _int_in(m, "smPercent", where, 100, 1, 100)


def _functions(raw: object, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    names = tuple(_function(f, f"{where}[{i}]") for i, f in enumerate(_list(raw, where)))
    if len(set(names)) != len(names):
        raise TenantConfigError(f"{where}: lists a function twice")
    return names


def _function(raw: object, where: str) -> str:
    value = _string(raw, where)
    if not _FUNCTION.match(value):
        raise TenantConfigError(f"{where}: {value!r} is not a valid function name")
    return value


def _name(raw: object, where: str) -> str:
    value = _string(raw, where)
    if not _NAME.match(value):
        raise TenantConfigError(
            f"{where}: {value!r} must be a DNS label (lowercase letters, digits, '-', at most 63)"
        )
    return value


def _sha256(raw: object, where: str) -> str:
    value = _string(raw, where)
    if not _SHA256.match(value):
        raise TenantConfigError(f"{where}: expected 64 lowercase hex digits, got {value!r}")
    return value


def _url(raw: object, where: str) -> str:
    value = _string(raw, where)
    if not value.startswith(("http://", "https://")):
        raise TenantConfigError(f"{where}: only http:// and https:// URLs are supported, got {value!r}")
    return value


def _string(raw: object, where: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise TenantConfigError(f"{where}: expected a non-empty string, got {raw!r}")
    return raw


def _list(raw: object, where: str) -> list[Any]:
    if not isinstance(raw, list):
        raise TenantConfigError(f"{where}: expected a list, got {type(raw).__name__}")
    return raw


def _mapping(raw: object, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        got = "nothing" if raw is None else type(raw).__name__
        raise TenantConfigError(f"{where}: expected a mapping, got {got}")
    return raw


def _reject_unknown(m: Mapping[str, Any], where: str, known: set[str]) -> None:
    unknown = sorted(set(m) - known)
    if unknown:
        raise TenantConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
