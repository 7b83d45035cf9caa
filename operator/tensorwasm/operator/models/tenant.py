"""The Tenant resource as typed values: spec (what the user asked), the shard's runtime report.

Owns parsing a Tenant body into `Tenant`; the CRD schema refuses most bad input first, this
catches what CEL cannot (quantities out of range, caps past what a shard can ever hold).
Must not import kopf, kube/ or anything doing I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tensorwasm.operator.models.quantity import parse_bytes

WASM32_MAX_MEMORY = 4 << 30
DEFAULT_LINEAR_MEMORY = 64 << 20
DEFAULT_MAX_BODY = 1 << 20


class InvalidSpec(ValueError):
    """The Tenant's spec cannot be served as written; the message says which field and why."""


@dataclass(frozen=True)
class ModuleSource:
    sha256: str
    config_map: str | None = None
    config_map_key: str = "module.wasm"
    url: str | None = None


@dataclass(frozen=True)
class Limits:
    gpu_memory_bytes: int | None = None  # None: accounting only
    linear_memory_bytes: int = DEFAULT_LINEAR_MEMORY
    timeout_ms: int = 1000
    max_concurrency: int = 4
    queue_length: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY


@dataclass(frozen=True)
class TenantSpec:
    module: ModuleSource
    functions: tuple[str, ...]
    limits: Limits = Limits()
    sm_percent: int = 0  # 0: no SM share requested
    snapshot_policy: str = "OnMove"
    snapshot_interval_s: int | None = None  # Periodic only
    snapshot_retain: int = 3  # Ready Snapshots kept
    restore_from: str | None = None
    auth_secret_name: str | None = None
    preferred_shard: int | None = None


@dataclass(frozen=True)
class RuntimeReport:
    """What the serving shard wrote into status.runtime."""

    shard: str
    observed_generation: int
    loaded: bool
    reason: str
    message: str
    gpu_bytes_in_use: int


@dataclass(frozen=True)
class Tenant:
    namespace: str
    name: str
    uid: str
    generation: int
    deleting: bool
    finalizers: tuple[str, ...]
    spec: TenantSpec | None  # None when invalid; see spec_error
    spec_error: str | None
    status: Mapping[str, Any]
    runtime: RuntimeReport | None

    @property
    def shard(self) -> str | None:
        value = self.status.get("shard")
        return value if isinstance(value, str) and value else None


def _int(spec: Mapping[str, Any], key: str, default: int, field: str) -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(f"{field} must be an integer, got {value!r}")
    return value


def parse_spec(spec: Mapping[str, Any]) -> TenantSpec:
    """Typed spec; raises InvalidSpec naming the offending field."""
    module = spec.get("module") or {}
    sha = module.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise InvalidSpec("spec.module.sha256 must be 64 lowercase hex characters")
    cm = module.get("configMapRef")
    url = module.get("url")
    if (cm is None) == (url is None):
        raise InvalidSpec("exactly one of spec.module.configMapRef or spec.module.url must be set")
    source = ModuleSource(
        sha256=sha,
        config_map=cm.get("name") if cm else None,
        config_map_key=(cm or {}).get("key", "module.wasm"),
        url=url,
    )
    functions = spec.get("functions") or []
    if not functions:
        raise InvalidSpec("spec.functions must name at least one exported function")

    raw = spec.get("limits") or {}
    try:
        gpu = raw.get("gpuMemory")
        limits = Limits(
            gpu_memory_bytes=None if gpu is None else parse_bytes("spec.limits.gpuMemory", gpu),
            linear_memory_bytes=parse_bytes(
                "spec.limits.linearMemory", raw.get("linearMemory", DEFAULT_LINEAR_MEMORY)
            ),
            timeout_ms=_int(raw, "timeoutMs", 1000, "spec.limits.timeoutMs"),
            max_concurrency=_int(raw, "maxConcurrency", 4, "spec.limits.maxConcurrency"),
            queue_length=_int(raw, "queueLength", 64, "spec.limits.queueLength"),
            max_body_bytes=parse_bytes("spec.limits.maxBodyBytes", raw.get("maxBodyBytes", DEFAULT_MAX_BODY)),
        )
    except ValueError as exc:
        raise InvalidSpec(str(exc)) from exc
    if limits.linear_memory_bytes < 64 << 10 or limits.linear_memory_bytes > WASM32_MAX_MEMORY:
        raise InvalidSpec(
            f"spec.limits.linearMemory must be between 64Ki (one wasm page) and 4Gi (wasm32), "
            f"got {limits.linear_memory_bytes} bytes"
        )
    if limits.max_concurrency < 1:
        raise InvalidSpec("spec.limits.maxConcurrency must be at least 1")
    if limits.max_body_bytes < 1:
        raise InvalidSpec("spec.limits.maxBodyBytes must be at least 1 byte")

    gpu_share = spec.get("gpu") or {}
    snapshot = spec.get("snapshot") or {}
    auth = spec.get("authSecretRef") or {}
    placement = spec.get("placement") or {}
    preferred = placement.get("preferredShard")
    return TenantSpec(
        module=source,
        functions=tuple(functions),
        limits=limits,
        sm_percent=_int(gpu_share, "smPercent", 0, "spec.gpu.smPercent"),
        snapshot_policy=str(snapshot.get("policy", "OnMove")),
        snapshot_interval_s=(
            None
            if snapshot.get("intervalSeconds") is None
            else _int(snapshot, "intervalSeconds", 0, "spec.snapshot.intervalSeconds")
        ),
        snapshot_retain=_int(snapshot, "retain", 3, "spec.snapshot.retain"),
        restore_from=spec.get("restoreFrom"),
        auth_secret_name=auth.get("name"),
        preferred_shard=None if preferred is None else _int(placement, "preferredShard", 0, "preferredShard"),
    )


def parse_runtime(status: Mapping[str, Any]) -> RuntimeReport | None:
    raw = status.get("runtime")
    if not isinstance(raw, Mapping) or not raw.get("shard"):
        return None
    gpu = raw.get("gpuBytesInUse", 0)
    gen = raw.get("observedGeneration", 0)
    return RuntimeReport(
        shard=str(raw["shard"]),
        observed_generation=gen if isinstance(gen, int) else 0,
        loaded=raw.get("loaded") is True,
        reason=str(raw.get("reason") or ""),
        message=str(raw.get("message") or ""),
        gpu_bytes_in_use=gpu if isinstance(gpu, int) and not isinstance(gpu, bool) else 0,
    )


def parse_tenant(body: Mapping[str, Any]) -> Tenant:
    """One parse per event: a bad spec becomes `spec_error`, never an exception."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    spec: TenantSpec | None
    error: str | None
    try:
        spec, error = parse_spec(body.get("spec") or {}), None
    except InvalidSpec as exc:
        spec, error = None, str(exc)
    return Tenant(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation") or 0),
        deleting=bool(meta.get("deletionTimestamp")),
        finalizers=tuple(meta.get("finalizers") or ()),
        spec=spec,
        spec_error=error,
        status=status,
        runtime=parse_runtime(status),
    )
