"""The operator's one settings object, read from TENSORWASM_OPERATOR_* variables at start.

Owns configuration parsing and its error messages (fail fast, name the variable).
Must not import kopf or kube/.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tensorwasm.api.logs import check_format
from tensorwasm.api.quantity import quantity_bytes
from tensorwasm.planner.admission import ShardCapacity

PREFIX = "TENSORWASM_OPERATOR_"
FIELD_MANAGER = "tensorwasm-operator"


class SettingsError(ValueError):
    """A TENSORWASM_OPERATOR_* variable has a value the operator cannot use."""


@dataclass(frozen=True)
class OperatorSettings:
    namespace: str = "default"
    shards: int = 2  # initial StatefulSet replicas; afterwards the StatefulSet's replicas rule
    shard_name: str = "tensorwasm-shard"
    shard_capacity: ShardCapacity = field(
        default_factory=lambda: ShardCapacity(
            gpu_memory_bytes=16 << 30, sm_percent=100, host_memory_bytes=32 << 30, max_tenants=64
        )
    )
    image: str = "ghcr.io/tensorwasm/tensorwasm:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    runtime_port: int = 8080
    admin_port: int = 9090  # the shard's /metrics and readiness detail (never tenant-facing)
    service_port: int = 80
    shard_node_selector: Mapping[str, str] = field(default_factory=dict)
    shard_tolerations: tuple[Mapping[str, Any], ...] = ()
    shard_gpus: int = 0  # nvidia.com/gpu requested per shard pod (0 on CPU shards)
    shard_service_account: str = ""  # "" = the namespace's default ServiceAccount
    shard_mps_pipe_dir: str = ""  # "" = no MPS; else the host's MPS pipe directory (absolute)
    shard_hot_tier_bytes: int = 256 << 20  # each shard's snapshot hot tier (pinned host memory on GPUs)
    shard_idle_after: str = "never"  # the shards' idle.after for tenants setting none (docs/operator.md)
    # The shards' --prewarm-tenants: at most this many tenants awake on a prediction and unused (the
    # runtime's default, 4; a test compares).
    shard_prewarm_tenants: int = 4
    # The shards' --handoff-max: a scale-in's hand-off waits at most this long for held tenants'
    # running work (each within its timeoutMs, at most 600 s) and their captures; the shard pods'
    # terminationGracePeriodSeconds is this plus the shutdown after it (desired/shards.py).
    shard_handoff_max_s: int = 660
    owner_deployment: str = ""  # the operator's Deployment: owns the shard set, so uninstall removes it
    shard_snapshot_claim: str = ""  # PVC every shard mounts for snapshots; "" = an emptyDir per pod
    # Shards' snapshot signing (docs/snapshot-format.md): the mode, and the Secret of HMAC keys
    # (<key id> entries + `active`) mounted into every shard pod; "" = no keys.
    shard_snapshot_signing: str = "verify-if-present"
    shard_snapshot_signing_secret: str = ""
    # Shards' audit log (docs/runtime.md "Audit log"): stdout (the node's log pipeline collects it),
    # off, or file: rotated files on a volume of their own, the PVC below or an emptyDir.
    shard_audit_log: str = "stdout"
    shard_audit_claim: str = ""
    shard_resources: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    )
    standalone: bool = True
    peering_name: str = "tensorwasm"
    log_level: str = "INFO"
    log_format: str = "text"  # or json: tensorwasm.api.logs, the runtime's format too
    reconcile_retry_s: float = 2.0
    move_snapshot_timeout_s: int = 120  # a move not done this long after it began rolls back
    # kopf's liveness endpoint (GET /healthz). Off (0) unless set: operators started side by side on
    # one host (tests, the dev stack) would fight over a fixed port; the chart sets 8081.
    liveness_port: int = 0
    # Our own health server: /healthz, /readyz and /metrics. It answers on standby replicas too
    # (kopf's endpoint only exists once kopf runs, i.e. on the leader). Off (0) unless set.
    health_port: int = 0
    # Unreachable API server, refused credentials, missing CRDs: retried this long, then exit 1.
    startup_timeout_s: int = 30
    # Leader election through a coordination.k8s.io Lease of this name ("" = off: run at once).
    leader_election_lease: str = ""
    lease_duration_s: int = 8  # a standby takes over once the lease went unrenewed this long
    renew_deadline_s: int = 6  # the leader exits when it could not renew for this long (< duration)
    lease_retry_s: int = 2  # how often the leader renews and a standby tries to acquire
    identity: str = ""  # this replica in the Lease (IDENTITY, else POD_NAME, else host name and pid)

    @property
    def liveness_endpoint(self) -> str | None:
        return f"http://0.0.0.0:{self.liveness_port}/healthz" if self.liveness_port else None


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(PREFIX + name)
    return value if value not in (None, "") else None


def _int(
    env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None
) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name} must be an integer, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise SettingsError(f"{PREFIX}{name} must be {bound}, got {value}")
    return value


def _bytes(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        return quantity_bytes(raw)
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}{name} {exc}") from None


def _idle_after(env: Mapping[str, str], default: str) -> str:
    from tensorwasm.api.fields import matches
    from tensorwasm.api.tenant import IDLE_AFTER_PATTERN

    raw = _get(env, "SHARD_IDLE_AFTER")
    if raw is None:
        return default
    if not matches(IDLE_AFTER_PATTERN, raw):
        raise SettingsError(f"{PREFIX}SHARD_IDLE_AFTER must be a duration (5m, 2h) or never, got {raw!r}")
    return raw


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{PREFIX}{name} must be true or false, got {raw!r}")


def _json(env: Mapping[str, str], name: str, kind: type) -> Any:
    raw = _get(env, name)
    if raw is None:
        return kind()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{PREFIX}{name} must be JSON: {exc}") from None
    if not isinstance(value, kind):
        raise SettingsError(f"{PREFIX}{name} must be a JSON {kind.__name__}, got {raw!r}")
    return value


def _resources(
    env: Mapping[str, str], default: Mapping[str, Mapping[str, str]]
) -> Mapping[str, Mapping[str, str]]:
    """A container's `resources` (requests/limits of quantities) as JSON, e.g. from the chart's values."""
    if _get(env, "SHARD_RESOURCES") is None:
        return default
    value = _json(env, "SHARD_RESOURCES", dict)
    if set(value) - {"requests", "limits"} or not all(
        isinstance(v, dict) and all(isinstance(q, str | int) for q in v.values()) for v in value.values()
    ):
        raise SettingsError(
            f'{PREFIX}SHARD_RESOURCES must be {{"requests": {{...}}, "limits": {{...}}}} of quantities,'
            f" got {_get(env, 'SHARD_RESOURCES')!r}"
        )
    return {k: {r: str(q) for r, q in v.items()} for k, v in value.items()}


class _Recorded(Mapping[str, str]):
    """The environment, noting which names were looked up (an unknown variable is a typo)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env, self.read = env, set[str]()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self.env[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.env)

    def __len__(self) -> int:
        return len(self.env)


# The runtime's --snapshot-signing modes (the operator must not import the runtime; a test compares).
SNAPSHOT_SIGNING_MODES = ("require", "verify-if-present", "off")
AUDIT_LOG_TARGETS = ("stdout", "off", "file")


def load_settings(env: Mapping[str, str] | None = None) -> OperatorSettings:
    """Settings from the environment (os.environ by default); raises SettingsError on bad values
    and on TENSORWASM_OPERATOR_* variables it does not know (a misspelt one would be ignored)."""
    recorded = _Recorded(os.environ if env is None else env)
    settings = _parse(recorded)
    unknown = sorted(k for k in recorded if k.startswith(PREFIX) and k not in recorded.read)
    if unknown:
        raise SettingsError(f"unknown variable(s) {', '.join(unknown)}: docs/operator.md lists the settings")
    return settings


def _parse(env: Mapping[str, str]) -> OperatorSettings:
    defaults = OperatorSettings()
    cap = defaults.shard_capacity
    namespace = _get(env, "NAMESPACE") or env.get("POD_NAMESPACE") or defaults.namespace
    log_level = (_get(env, "LOG_LEVEL") or defaults.log_level).upper()
    try:
        log_format = check_format(_get(env, "LOG_FORMAT") or defaults.log_format)
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}LOG_FORMAT {exc}") from None
    lease_duration = _int(env, "LEASE_DURATION", defaults.lease_duration_s, 2, 300)
    renew_deadline = _int(env, "RENEW_DEADLINE", defaults.renew_deadline_s, 1, 300)
    lease_retry = _int(env, "LEASE_RETRY", defaults.lease_retry_s, 1, 60)
    if not lease_retry < renew_deadline < lease_duration:
        # A leader must give up before a standby may take over, or both would write for a while.
        raise SettingsError(
            f"{PREFIX}LEASE_RETRY ({lease_retry}) < {PREFIX}RENEW_DEADLINE ({renew_deadline}) < "
            f"{PREFIX}LEASE_DURATION ({lease_duration}) must hold"
        )
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError(f"{PREFIX}LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    try:
        capacity = ShardCapacity(
            gpu_memory_bytes=_bytes(env, "SHARD_GPU_MEMORY", cap.gpu_memory_bytes),
            sm_percent=_int(env, "SHARD_SM_PERCENT", cap.sm_percent, 1, 100),
            host_memory_bytes=_bytes(env, "SHARD_HOST_MEMORY", cap.host_memory_bytes),
            max_tenants=_int(env, "SHARD_MAX_TENANTS", cap.max_tenants, 1),
            active_fraction=_int(env, "SHARD_ACTIVE_PERCENT", round(cap.active_fraction * 100), 1, 100) / 100,
            idle_by_default=_idle_after(env, defaults.shard_idle_after) != "never",
        )
    except ValueError as exc:
        raise SettingsError(f"shard capacity: {exc}") from None
    shard_name = _get(env, "SHARD_NAME") or defaults.shard_name
    if len(shard_name) > 52:  # leaves room for "-<ordinal>" and the controller-revision label
        raise SettingsError(f"{PREFIX}SHARD_NAME must be at most 52 characters, got {shard_name!r}")
    tolerations = _json(env, "SHARD_TOLERATIONS", list)
    signing_mode = _get(env, "SHARD_SNAPSHOT_SIGNING") or defaults.shard_snapshot_signing
    signing_secret = _get(env, "SHARD_SNAPSHOT_SIGNING_SECRET") or ""
    if signing_mode not in SNAPSHOT_SIGNING_MODES:
        raise SettingsError(
            f"{PREFIX}SHARD_SNAPSHOT_SIGNING must be one of {', '.join(SNAPSHOT_SIGNING_MODES)}, "
            f"got {signing_mode!r}"
        )
    if signing_mode == "require" and not signing_secret:
        # The shards would refuse to start: say so here, once, instead of in a crash loop.
        raise SettingsError(
            f"{PREFIX}SHARD_SNAPSHOT_SIGNING=require needs {PREFIX}SHARD_SNAPSHOT_SIGNING_SECRET "
            "(a Secret with the keys and `active`)"
        )
    audit_log = _get(env, "SHARD_AUDIT_LOG") or defaults.shard_audit_log
    if audit_log not in AUDIT_LOG_TARGETS:
        raise SettingsError(
            f"{PREFIX}SHARD_AUDIT_LOG must be one of {', '.join(AUDIT_LOG_TARGETS)}, got {audit_log!r}"
        )
    mps_pipe_dir = _get(env, "SHARD_MPS_PIPE_DIR") or ""
    if mps_pipe_dir and not mps_pipe_dir.startswith("/"):
        raise SettingsError(f"{PREFIX}SHARD_MPS_PIPE_DIR must be an absolute path, got {mps_pipe_dir!r}")
    return OperatorSettings(
        namespace=namespace,
        shards=_int(env, "SHARDS", defaults.shards, 1, 1000),
        shard_name=shard_name,
        shard_capacity=capacity,
        image=_get(env, "IMAGE") or defaults.image,
        image_pull_policy=_get(env, "IMAGE_PULL_POLICY") or defaults.image_pull_policy,
        runtime_port=_int(env, "RUNTIME_PORT", defaults.runtime_port, 1, 65535),
        admin_port=_int(env, "ADMIN_PORT", defaults.admin_port, 1, 65535),
        service_port=_int(env, "SERVICE_PORT", defaults.service_port, 1, 65535),
        shard_node_selector={str(k): str(v) for k, v in _json(env, "SHARD_NODE_SELECTOR", dict).items()},
        shard_tolerations=tuple(tolerations),
        shard_gpus=_int(env, "SHARD_GPUS", defaults.shard_gpus, 0, 16),
        shard_service_account=_get(env, "SHARD_SERVICE_ACCOUNT") or "",
        shard_mps_pipe_dir=mps_pipe_dir,
        shard_snapshot_claim=_get(env, "SHARD_SNAPSHOT_CLAIM") or "",
        shard_snapshot_signing=signing_mode,
        shard_snapshot_signing_secret=signing_secret,
        shard_audit_log=audit_log,
        shard_audit_claim=_get(env, "SHARD_AUDIT_CLAIM") or "",
        owner_deployment=_get(env, "OWNER_DEPLOYMENT") or "",
        shard_hot_tier_bytes=_bytes(env, "SHARD_HOT_TIER_BYTES", defaults.shard_hot_tier_bytes),
        shard_idle_after=_idle_after(env, defaults.shard_idle_after),
        shard_prewarm_tenants=_int(env, "SHARD_PREWARM_TENANTS", defaults.shard_prewarm_tenants, 0, 10_000),
        # The runtime's --handoff-max range (HANDOFF_MAX_RANGE there; a test compares).
        shard_handoff_max_s=_int(env, "SHARD_HANDOFF_MAX", defaults.shard_handoff_max_s, 45, 3660),
        shard_resources=_resources(env, defaults.shard_resources),
        standalone=_bool(env, "STANDALONE", defaults.standalone),
        peering_name=_get(env, "PEERING_NAME") or defaults.peering_name,
        log_level=log_level,
        move_snapshot_timeout_s=_int(env, "MOVE_SNAPSHOT_TIMEOUT", defaults.move_snapshot_timeout_s, 1, 3600),
        liveness_port=_int(env, "LIVENESS_PORT", defaults.liveness_port, 0, 65535),
        log_format=log_format,
        health_port=_int(env, "HEALTH_PORT", defaults.health_port, 0, 65535),
        startup_timeout_s=_int(env, "STARTUP_TIMEOUT", defaults.startup_timeout_s, 1, 3600),
        leader_election_lease=_get(env, "LEADER_ELECTION_LEASE") or "",
        lease_duration_s=lease_duration,
        renew_deadline_s=renew_deadline,
        lease_retry_s=lease_retry,
        identity=_get(env, "IDENTITY") or env.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
    )
