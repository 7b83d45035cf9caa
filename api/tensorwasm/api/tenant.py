"""The Tenant resource: its spec model (every default and bound declared once), the shard's report.

Owns `TenantSpec` and its parts, `parse_spec` (the one validator of a Tenant spec: the operator,
the runtime shard, the planner's admission and the CRD generated in tensorwasm.api.crd all use
it), the object view `Tenant` with `parse_tenant`, and `RuntimeReport` (status.runtime, written by
the serving shard). Verdicts where the old validators disagreed: gpuMemory, when set, is at least
one byte (absent means accounting only); maxBodyBytes is at least one byte; timeoutMs is at most
600000 (10 minutes); no smPercent means no SM share requested (the shard's whole MPS slice).
A new bounded limit is one line in `Limits`. Pure; imports only tensorwasm.api.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

from tensorwasm.api.fields import (
    InvalidSpec,
    Rule,
    integer,
    matches,
    nested,
    nested_list,
    parse_model,
    quantity,
    string,
    strings,
)
from tensorwasm.api.names import TENANT_NAME_MAX, TENANT_NAME_PATTERN, token_secret_name

WASM_PAGE = 64 << 10  # bytes in one WebAssembly page
WASM32_MAX_MEMORY = 4 << 30  # the most a 32-bit linear memory can address
FUNCTION_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-]*$"
KERNEL_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
POLICIES = ("Manual", "OnMove", "Periodic")
# Far past any GPU; and below 1000Ti-1023Ti, spellings the API server's quantity maths misreads in
# the CRD's CEL rule (found by tests/cluster/test_api_verdicts.py on Kubernetes 1.37).
GPU_MEMORY_MAX = 512 << 40


def is_http_url(value: str) -> bool:
    """An absolute http(s) URL with a host, as the CRD's isURL/getScheme rule reads it."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc) and " " not in value


URL_RULE = Rule(
    "isURL(self) && url(self).getScheme() in ['https', 'http']",
    "module.url must be an absolute http:// or https:// URL",
    is_http_url,
)


@dataclass(frozen=True, kw_only=True)
class ModuleConfigMapRef:
    name: str = string("name", "ConfigMap name.", required=True, min_length=1, max_length=253)
    key: str = string(
        "key", "Key in binaryData (or data) holding the module.", default="module.wasm", min_length=1,
        max_length=253,
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Module:
    RULES: ClassVar = (
        Rule(
            "has(self.configMapRef) != has(self.url)",
            "exactly one of module.configMapRef or module.url must be set",
            lambda m: ("configMapRef" in m) != ("url" in m),
        ),
    )
    sha256: str = string(
        "sha256", "SHA-256 of the module bytes, 64 lowercase hex characters; the shard refuses any other bytes.",
        required=True, max_length=64, pattern=SHA256_PATTERN,
    )  # fmt: skip
    config_map: ModuleConfigMapRef | None = nested(
        "configMapRef", ModuleConfigMapRef,
        "A ConfigMap in the tenant's namespace; the module bytes are binaryData[key] (or data[key] for text).",
    )  # fmt: skip
    url: str | None = string(
        "url", "An http(s) URL the shard fetches the module from.", max_length=2048, rules=(URL_RULE,)
    )


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Per-tenant limits the runtime shard enforces; one line per limit."""

    gpu_memory_bytes: int | None = quantity("gpuMemory", "GPU memory cap (quantity, e.g. 256Mi). Absent means the shard's default cap (--default-gpu-memory, 1Gi).", minimum=1, maximum=GPU_MEMORY_MAX)  # fmt: skip
    linear_memory_bytes: int = quantity("linearMemory", "Wasm linear memory limit per instance (quantity, one 64Ki page to 4Gi).", default="64Mi", minimum=WASM_PAGE, maximum=WASM32_MAX_MEMORY)  # fmt: skip
    timeout_ms: int = integer("timeoutMs", "Per-invoke deadline in milliseconds.", default=1000, minimum=1, maximum=600_000)  # fmt: skip
    max_concurrency: int = integer("maxConcurrency", "Concurrent invokes (warm instances) for this tenant.", default=4, minimum=1, maximum=1024)  # fmt: skip
    queue_length: int = integer("queueLength", "Bounded queue of waiting invokes; a full queue answers 429.", default=64, minimum=0, maximum=100_000)  # fmt: skip
    max_body_bytes: int = quantity("maxBodyBytes", "Largest request body (quantity).", default="1Mi", minimum=1, maximum=1 << 30)  # fmt: skip
    # Guest resources beyond memory and time (issue 13); docs/runtime.md "Limits" says what each refusal looks like.
    max_output_bytes: int = quantity("maxOutputBytes", "Largest output one invoke may return (quantity).", default="16Mi", minimum=0, maximum=WASM32_MAX_MEMORY)  # fmt: skip
    max_table_elements: int = integer("maxTableElements", "Elements each wasm table may grow to; an instance whose table grew is replaced.", default=100_000, minimum=0, maximum=10_000_000)  # fmt: skip
    host_calls_per_invoke: int = integer("hostCallsPerInvoke", "Host calls one invoke may make; the call past it traps.", default=100_000, minimum=1, maximum=1 << 40)  # fmt: skip
    host_calls_per_second: int = integer("hostCallsPerSecond", "Host calls per second for the tenant; faster calls wait, charged to the invoke's deadline.", default=20_000, minimum=1, maximum=1 << 40)  # fmt: skip
    log_bytes_per_invoke: int = quantity("logBytesPerInvoke", "Guest log bytes one invoke may write; further lines are dropped and counted.", default="16Ki", minimum=0, maximum=1 << 30)  # fmt: skip
    log_bytes_per_second: int = quantity("logBytesPerSecond", "Guest log bytes per second for the tenant; further lines are dropped and counted.", default="64Ki", minimum=0, maximum=1 << 30)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class RateLimit:
    """Invokes per second for the whole tenant (every token of it), as a token bucket (issue 14)."""

    requests_per_second: int | None = integer("requestsPerSecond", "Invokes per second the tenant may start (sync, async and streamed alike); absent means no limit. Past it the shard answers 429 rate_limited with Retry-After from the bucket.", minimum=1, maximum=1_000_000)  # fmt: skip
    burst: int | None = integer("burst", "Invokes the bucket holds when full (a burst after a quiet spell); absent means one second's worth (requestsPerSecond).", minimum=1, maximum=1_000_000)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class GpuShare:
    sm_percent: int | None = integer(
        "smPercent", "Percent of the GPU's SMs; absent means no share requested.", minimum=1, maximum=100
    )


@dataclass(frozen=True, kw_only=True)
class KernelConfigMapRef:
    name: str = string("name", "ConfigMap name.", required=True, min_length=1, max_length=253)
    key: str = string("key", "Key holding the PTX text.", default="kernel.ptx", min_length=1, max_length=253)


@dataclass(frozen=True, kw_only=True)
class Kernel:
    """A PTX kernel the guest may launch, from a ConfigMap key."""

    name: str = string(
        "name", "Kernel name the guest launches.", required=True, min_length=1, max_length=128,
        pattern=KERNEL_NAME_PATTERN,
    )  # fmt: skip
    config_map: KernelConfigMapRef = nested(
        "configMapRef", KernelConfigMapRef, "ConfigMap key holding the PTX text.", required=True
    )


@dataclass(frozen=True, kw_only=True)
class SnapshotPolicy:
    RULES: ClassVar = (
        Rule(
            # has(): the CRD checks its `default: {}` against this rule before defaulting policy.
            "!has(self.policy) || self.policy != 'Periodic' || has(self.intervalSeconds)",
            "snapshot.intervalSeconds is required when snapshot.policy is Periodic",
            lambda s: s.get("policy") != "Periodic" or "intervalSeconds" in s,
            field_path=".intervalSeconds",
        ),
    )
    policy: str = string(
        "policy", "Manual (only Snapshot objects), OnMove (also before moving shards), Periodic.",
        default="OnMove", enum=POLICIES,
    )  # fmt: skip
    interval_s: int | None = integer("intervalSeconds", "Period of Periodic snapshots.", minimum=60, maximum=31_536_000)  # fmt: skip
    retain: int = integer("retain", "Ready snapshots kept per tenant.", default=3, minimum=1, maximum=100)


@dataclass(frozen=True, kw_only=True)
class SecretRef:
    name: str = string("name", "Secret name.", required=True, min_length=1, max_length=253)


@dataclass(frozen=True, kw_only=True)
class PlacementHints:
    preferred_shard: int | None = integer(
        "preferredShard", "Shard ordinal to prefer when it has room.", minimum=0, maximum=999
    )


IDLE_AFTER_PATTERN = r"^(never|[1-9][0-9]{0,6}(ms|s|m|h))$"
# spec.idle.after's floor: shorter, a tenant would be captured after nearly every request and restored
# on the next (its whole state written to the shared snapshot volume each time). The same floor as a
# pattern for the CRD's CEL rule (CEL has no unit-aware parse that stays within range for 9999999h).
IDLE_AFTER_MIN_S = 10
IDLE_AFTER_FLOOR_PATTERN = r"^(never|[1-9][0-9]{4,6}ms|[1-9][0-9]{1,6}s|[1-9][0-9]{0,6}(m|h))$"
PREWARM_HISTORY = "history"  # spec.idle.prewarm: wake ahead of the tenant's daily arrival pattern
PREWARM_PATTERN = r"^(none|history)$"  # not "off": YAML 1.1 reads it as false
_IDLE_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def idle_seconds(after: str) -> float | None:
    """spec.idle.after in seconds; None for `never`. `after` matches IDLE_AFTER_PATTERN."""
    if after == "never":
        return None
    unit = "ms" if after.endswith("ms") else after[-1]
    return int(after[: -len(unit)]) * _IDLE_UNITS[unit]


def _idle_after_floor(value: object) -> bool:
    seconds = idle_seconds(value) if isinstance(value, str) else None
    return seconds is None or seconds >= IDLE_AFTER_MIN_S


IDLE_AFTER_RULE = Rule(
    f"self.matches('{IDLE_AFTER_FLOOR_PATTERN}')",
    f"must be 'never' or at least {IDLE_AFTER_MIN_S}s: a shorter idle.after would capture the tenant's "
    "whole state after nearly every request",
    _idle_after_floor,
)


@dataclass(frozen=True, kw_only=True)
class IdlePolicy:
    """When an idle tenant sleeps in a snapshot (docs/operator.md "Idle tenants sleep")."""

    after: str | None = string(
        "after", "Sleep after this long without a request: a duration (10s, 30s, 5m, 2h) or 'never'. "
        "At least 10s. Absent means the shard's default (chart value shard.idle.after). A sleeping tenant "
        "holds no instances and no GPU memory; its first request wakes it from the snapshot.",
        max_length=16, pattern=IDLE_AFTER_PATTERN, rules=(IDLE_AFTER_RULE,),
    )  # fmt: skip
    prewarm: str | None = string(
        "prewarm", "Wake this tenant ahead of predicted use. 'history': its shard wakes it shortly before "
        "a 5-minute slot of the day in which it received requests on at least half of the last 7 days "
        "(at least 2 days seen), only into free GPU room (never by putting another tenant to sleep) and "
        "for at most the shard's prewarm budget of tenants at once; unused, it sleeps again after "
        "idle.after. 'none' or absent: only a request wakes it.",
        max_length=16, pattern=PREWARM_PATTERN,
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TenantSpec:
    """What the tenant runs and within which limits."""

    module: Module = nested(
        "module", Module, "The WebAssembly module, from a ConfigMap key or a URL, pinned by its sha256.", required=True
    )  # fmt: skip
    functions: tuple[str, ...] = strings(
        "functions", "Exported functions callable over HTTP.", required=True, min_items=1, max_items=256,
        max_length=128, pattern=FUNCTION_NAME_PATTERN,
    )  # fmt: skip
    limits: Limits = nested(
        "limits", Limits, "Per-tenant limits enforced by the runtime shard.", default_empty=True
    )
    gpu: GpuShare = nested(
        "gpu", GpuShare, "The tenant's share of the GPU's streaming multiprocessors (MPS active thread percentage).",
        default_empty=True,
    )  # fmt: skip
    kernels: tuple[Kernel, ...] = nested_list(
        "kernels", Kernel, "Tenant-supplied PTX kernels, compiled once per shard and cached.", map_key="name", max_items=64
    )  # fmt: skip
    snapshot: SnapshotPolicy = nested("snapshot", SnapshotPolicy, "When the tenant's state is captured.", default_empty=True)  # fmt: skip
    restore_from: str | None = string(
        "restoreFrom", "Snapshot name to restore on cold start; default is the newest Ready snapshot.", max_length=253
    )  # fmt: skip
    auth_secret: SecretRef | None = nested(
        "authSecretRef", SecretRef,
        'Secret holding the bearer tokens: key "token" (invoke and read), optional keys "token.<id>" (more invoke tokens, for rotation) and "read-token"/"read-token.<id>" (read-only: listing, jobs, no invoke); the operator creates it with "token" when it does not exist.',
    )  # fmt: skip
    placement: PlacementHints = nested("placement", PlacementHints, "Placement hints.", default_empty=True)
    rate_limit: RateLimit = nested("rateLimit", RateLimit, "Request rate limit of the tenant (token bucket).", default_empty=True)  # fmt: skip
    idle: IdlePolicy = nested("idle", IdlePolicy, "Idle sleep: when the tenant gives its instances and GPU memory back.", default_empty=True)  # fmt: skip

    @property
    def sm_percent(self) -> int:
        """The SM share to reserve: 0 when none was requested."""
        return self.gpu.sm_percent or 0

    @property
    def auth_secret_name(self) -> str | None:
        return self.auth_secret.name if self.auth_secret is not None else None


def parse_spec(spec: object, *, from_api_server: bool = False) -> TenantSpec:
    """The one Tenant spec validator; raises InvalidSpec naming the offending field.

    `from_api_server`: the object passed the installed CRD's schema, so fields a newer CRD added
    are ignored rather than refused (see fields.parse_model), and values an older CRD allowed that
    the API server still keeps are raised to today's floor (`stored_spec_notes` says which)."""
    if from_api_server and _idle_after_under_floor(spec) is not None:
        assert isinstance(spec, Mapping)  # _idle_after_under_floor found spec.idle.after in it
        spec = {**spec, "idle": {**spec["idle"], "after": f"{IDLE_AFTER_MIN_S}s"}}
    return parse_model(TenantSpec, spec, "spec", ignore_unknown=from_api_server)


def _idle_after_under_floor(spec: object) -> str | None:
    """spec.idle.after when it is a well-formed duration under the floor, else None.

    Tenants created before the floor (the field's own example was "500ms") are still stored with
    such values: the CRD's rule ratchets (the API server lets an unchanged field through on update,
    a new or changed one is refused), so an object read from the API server may carry one. It keeps
    serving, sleeping after max(after, floor): never refused, its state never dropped for it."""
    idle = spec.get("idle") if isinstance(spec, Mapping) else None
    after = idle.get("after") if isinstance(idle, Mapping) else None
    if isinstance(after, str) and matches(IDLE_AFTER_PATTERN, after) and not _idle_after_floor(after):
        return after
    return None


def stored_spec_notes(spec: object) -> tuple[str, ...]:
    """What `parse_spec(spec, from_api_server=True)` raised to a floor, for the tenant's status."""
    after = _idle_after_under_floor(spec)
    if after is None:
        return ()
    return (
        f"spec.idle.after {after!r} is under the {IDLE_AFTER_MIN_S}s floor (a value stored before the floor "
        f"existed): the tenant sleeps after {IDLE_AFTER_MIN_S}s instead; set it to {IDLE_AFTER_MIN_S}s or "
        "more (a new or changed value under the floor is refused)",
    )


def tenant_name_problem(name: str) -> str | None:
    """Why `name` cannot name a Tenant (None: it can); the CRD's root rule says the same."""
    if len(name) > TENANT_NAME_MAX or not matches(TENANT_NAME_PATTERN, name):
        return NAME_RULE.message
    return None


NAME_RULE = Rule(
    f"self.metadata.name.size() <= {TENANT_NAME_MAX} && self.metadata.name.matches('{TENANT_NAME_PATTERN}')",
    f"tenant names must be DNS labels (lowercase letters, digits, '-') of at most {TENANT_NAME_MAX} "
    "characters: they name the tenant's Service",
)


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

    @property
    def token_secret(self) -> str:
        return token_secret_name(self.name, self.spec.auth_secret_name if self.spec is not None else None)


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


# The operator parses a Tenant on every event and the shards on every pass, but a spec changes far
# less often than its status: keep each uid's last verdict with the spec's JSON text it was for
# (dumping is ~10x cheaper than validating). The specs are frozen dataclasses, safe to share.
_SPEC_CACHE_MAX = 20_000
_spec_cache: dict[str, tuple[str, TenantSpec | None, str | None]] = {}


def _parse_api_spec(uid: str, raw: Any) -> tuple[TenantSpec | None, str | None]:
    try:
        text = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):  # not JSON data (a test's object): parse it without the cache
        text = ""
    hit = _spec_cache.get(uid) if uid and text else None
    if hit is not None and hit[0] == text:
        return hit[1], hit[2]
    spec: TenantSpec | None
    error: str | None
    try:
        spec, error = parse_spec(raw, from_api_server=True), None
    except InvalidSpec as exc:
        spec, error = None, str(exc)
    if uid and text:
        if len(_spec_cache) >= _SPEC_CACHE_MAX and uid not in _spec_cache:
            # The oldest entry (dicts keep insertion order); another thread may be at it too.
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del _spec_cache[next(iter(_spec_cache))]
        _spec_cache[uid] = (text, spec, error)
    return spec, error


def parse_tenant(body: Mapping[str, Any]) -> Tenant:
    """One parse per event: a bad spec becomes `spec_error`, never an exception."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    spec, error = _parse_api_spec(str(meta.get("uid", "")), body.get("spec") or {})
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
