"""The Kubernetes tenant source: the Tenants placed on this shard, their Secrets and ConfigMaps.

Owns `KubeSource` and the pure `resolve_tenants`. An informer (tensorwasm.kube.informer) per kind keeps
a cache of the namespace's Tenants, ConfigMaps, Secrets (and Snapshots with --snapshot-dir): one
list, then watch events; a re-list only on 410 Gone or every few minutes. A watch event that
concerns this shard (a Tenant whose status.shard is ours or was ours, a ConfigMap/Secret one of our
Tenants references, a Snapshot of ours or being deleted) marks the state dirty; the reconcile then
resolves everything from the caches (no API reads), hands the desired set to `Shard.sync`, and
writes `status.runtime` through the status subresource for each Tenant whose report changed. Like a
kubelet reporting Pod readiness, the same merge patch carries the phase, conditions and gpuBytesInUse
that the report implies, computed by the operator's own status maths (tensorwasm.api.conditions),
so the operator, reconciling that version, finds nothing to write: one write per report instead of
two. The operator stays the authority: where it would derive something else it writes its version.
Level-triggered like a kubelet: a restart lists and converges; nothing depends on seeing an event
exactly once. Every --resync seconds a pass
runs anyway (it refreshes gpuBytesInUse).
Moves (docs/operator.md "Moves"): a Tenant of ours whose status.move names this shard as the source
in phase Holding is held (`Shard.hold`: 503 tenant_moving with Retry-After, nothing new admitted);
its not-started async jobs fail (tenant_moving), and once its in-flight invokes are done its move
Snapshot is captured, never before. A Tenant that leaves this shard without being deleted stays held
after it is unloaded until its move is over (read by name: the watch no longer shows it) and
`MOVED_LINGER_S` more: clients still routed here (the Service selects this shard until the target
reports the tenant loaded; kube-proxy lags; keep-alive connections) are told to retry, and the 503
closes their connection so the retry reaches the new shard. A starting Tenant whose status.move
names this shard as the target restores exactly that move's Snapshot, or is reported not loaded
(MoveRestoreFailed) so that the move rolls back: never fresh or older state.
With --snapshot-dir it also drives the snapshot agent (snapshots/kube.py): a Tenant that starts
here restores its chosen Snapshot before it serves (through `Shard.prepare`), every Snapshot of a
tenant served here is captured, and a deleted Snapshot has its blob removed by the one live shard
`blob_deleter` names (live: its `<prefix>-<n>` pod exists), so a removed shard's Snapshots still go.
API calls go through the project's one async client (tensorwasm.kube) on the event loop; only
captures and restores (blocking) run in worker threads. Must not import wasmtime or cuda.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from tensorwasm.api.conditions import Placement, desired_status, truncate_message
from tensorwasm.api.fields import InvalidSpec
from tensorwasm.api.group import API_VERSION, LABEL_PURPOSE, SNAPSHOT, SNAPSHOT_BLOB_FINALIZER, TENANT
from tensorwasm.api.names import token_secret_name
from tensorwasm.api.stamps import now_rfc3339
from tensorwasm.api.tenant import parse_tenant
from tensorwasm.kube.client import KubeApi, KubeError, connect, resource_path
from tensorwasm.kube.informer import Informer
from tensorwasm.runtime.settings import RuntimeSettings
from tensorwasm.runtime.shard import PrepareRefused, ServedTenant, Shard, TenantStatus
from tensorwasm.runtime.tenancy.config import (
    TOKEN_KEY,
    TenantConfig,
    check_token_strength,
    parse_kube_tenant,
    token_key_scope,
)

if TYPE_CHECKING:
    from tensorwasm.runtime.accel.base import TenantDevice
    from tensorwasm.runtime.engine import TenantInstancePool
    from tensorwasm.runtime.snapshots.kube import SnapshotAgent, TenantHandle

log = logging.getLogger(__name__)
LOAD_WAIT_S = 10.0

PLURAL, SNAPSHOTS = TENANT.plural, SNAPSHOT.plural
SECRET_MISSING = "SecretMissing"
FIELD_MANAGER = "tensorwasm-shard"


def _token_secret(tenant_name: str, spec: Mapping[str, Any]) -> str:
    return token_secret_name(tenant_name, (spec.get("authSecretRef") or {}).get("name"))


CONFIGMAP_MISSING = "ConfigMapMissing"
CONFIGMAPS, SECRETS = "configmaps", "secrets"
_RELIST_S = 300  # informers re-list at most this often (and on 410 Gone); events fill the gaps
_LIVE_TTL_S = 5.0
_DEBOUNCE_S = 0.05
_WRITE_RETRY_S = 1.0  # a status write that failed is tried again this soon
# The operator creates a tenant's Secret before it places the tenant, but the two reach this shard on
# separate watches: a Secret or ConfigMap missing in the first moments after placement
# (settings.missing_grace_s) is most likely still in flight. Reporting it would cost a write now and
# another once it arrives.
_MAYBE_IN_FLIGHT = (SECRET_MISSING, CONFIGMAP_MISSING)
# A tenant that moved away answers 503 tenant_moving here until its move is over (status.move
# cleared: until then its Service may still select this shard), checked by name every
# _LEFT_CHECK_S (at most _LEFT_CHECKS_PER_S reads a second), then MOVED_LINGER_S more: kube-proxy
# re-programs a Service's ClusterIP seconds after it changes (more on a busy node). MOVED_MAX_S
# bounds it when the move never seems to end (the operator's move timeout is at most 3600 s).
MOVED_LINGER_S, MOVED_MAX_S = 30.0, 3660.0
_LEFT_CHECK_S, _LEFT_CHECKS_PER_S = 2.0, 20.0
# On SIGTERM a shard that is being scaled in hands its tenants off before it stops serving: moves
# must start within HANDOFF_START_S (else this is a restart, not a scale-in), all end within
# HANDOFF_MIN_S, or later where a tenant held at its barrier (or busy) needs its timeoutMs to drain
# plus HANDOFF_CAPTURE_S for its capture and the target's restore, never past --handoff-max (the
# pod's grace period is that plus the shutdown: the operator sets both from one value); then the
# shard answers "moving" HANDOFF_LINGER_S longer for clients that kube-proxy still routes here.
HANDOFF_START_S, HANDOFF_MIN_S, HANDOFF_CAPTURE_S, HANDOFF_LINGER_S = 5.0, 45.0, 45.0, 5.0
_WAKE_RETRY_S = 5.0  # a Snapshot whose sleeping tenant could not wake is tried again this soon
_MOVE_RESTORE_WAIT_S = 10.0  # a target waits this long for its cache to show the move's Snapshot Ready
HOLDING, MOVE_PURPOSE = "Holding", "move"
MOVE_RESTORE_FAILED = "MoveRestoreFailed"  # a move target could not restore the move's Snapshot
# Top-level status keys a shard report decides (the shard writes them with status.runtime).
READINESS_KEYS = ("phase", "conditions", "gpuBytesInUse", "gpuInUse")  # gpuInUse: the same bytes, for kubectl


@dataclass
class ClusterView:
    """What one re-list saw: our Tenants plus the ConfigMaps and Secrets they reference."""

    tenants: list[dict[str, Any]]
    configmaps: dict[str, dict[str, bytes]] = field(default_factory=dict)  # name -> key -> bytes
    secrets: dict[str, dict[str, bytes]] = field(default_factory=dict)
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # only with a snapshot agent
    versions: dict[str, str] = field(default_factory=dict)  # "kind/name" -> resourceVersion decoded


Resolution = TenantConfig | TenantStatus
# What a Tenant's resolution depends on: its own and its Secret's/ConfigMaps' resourceVersions.
ResolveMemo = dict[str, tuple[tuple[str, ...], Resolution]]


def referenced(tenant: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """(ConfigMap names, Secret names) a Tenant spec points at."""
    spec = tenant.get("spec") or {}
    cms: set[str] = set()
    module_ref = (spec.get("module") or {}).get("configMapRef") or {}
    if module_ref.get("name"):
        cms.add(module_ref["name"])
    for kernel in spec.get("kernels") or []:
        ref = (kernel or {}).get("configMapRef") or {}
        if ref.get("name"):
            cms.add(ref["name"])
    name = str((tenant.get("metadata") or {}).get("name", ""))
    return cms, {_token_secret(name, spec)}


def resolve_tenants(
    view: ClusterView, memo: ResolveMemo | None = None
) -> tuple[list[TenantConfig], dict[str, TenantStatus]]:
    """Turn a re-list into configs for the shard, and refusals for what cannot be resolved.

    With `memo` (owned by the caller, updated here), a Tenant whose object and referenced Secret and
    ConfigMaps kept their resourceVersions is not parsed again: during a burst of placements a
    pass then costs what changed, not what is served.
    """
    configs: list[TenantConfig] = []
    failed: dict[str, TenantStatus] = {}
    fresh: ResolveMemo = {}
    for obj in view.tenants:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", ""))
        key = _fingerprint(obj, view)
        known = (memo or {}).get(name)
        result = known[1] if known is not None and known[0] == key else _resolve_or_refuse(obj, view)
        fresh[name] = (key, result)
        if isinstance(result, TenantStatus):
            failed[name] = result
        else:
            configs.append(result)
    if memo is not None:
        memo.clear()
        memo.update(fresh)
    return configs, failed


def _fingerprint(obj: Mapping[str, Any], view: ClusterView) -> tuple[str, ...]:
    meta = obj.get("metadata") or {}
    cms, secrets = referenced(obj)
    refs = [f"{CONFIGMAPS}/{n}" for n in sorted(cms)] + [f"{SECRETS}/{n}" for n in sorted(secrets)]
    # An absent reference has no version: "" (its later arrival changes the key).
    return (
        str(meta.get("uid", "")),
        str(meta.get("resourceVersion", "")),
        *(view.versions.get(r, "") for r in refs),
    )


def _resolve_or_refuse(obj: Mapping[str, Any], view: ClusterView) -> Resolution:
    generation = int((obj.get("metadata") or {}).get("generation") or 0)
    try:
        return _resolve_one(obj, view)
    except _Unresolved as exc:
        return TenantStatus(False, exc.reason, exc.message, generation)
    except InvalidSpec as exc:
        return TenantStatus(False, exc.reason, str(exc), generation)
    except Exception as exc:  # whatever one Tenant holds refuses that Tenant, never the whole pass
        name = (obj.get("metadata") or {}).get("name")
        log.warning("Failed resolving Tenant name=%s", name, exc_info=exc)
        return TenantStatus(
            False, InvalidSpec.reason, f"cannot resolve: {type(exc).__name__}: {exc}", generation
        )


class _Unresolved(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def _resolve_one(obj: Mapping[str, Any], view: ClusterView) -> TenantConfig:
    spec = obj.get("spec") or {}
    ns = (obj.get("metadata") or {}).get("namespace", "")
    secret_name = _token_secret(str((obj.get("metadata") or {}).get("name", "")), spec)
    secret = view.secrets.get(secret_name)
    if secret is None:
        raise _Unresolved(SECRET_MISSING, f"Secret {ns}/{secret_name} not found")
    if "token" not in secret:
        raise _Unresolved(SECRET_MISSING, f"Secret {ns}/{secret_name} has no 'token' key")
    token = _secret_token(secret["token"], ns, secret_name, TOKEN_KEY)
    module_data, origin = None, ""
    ref = (spec.get("module") or {}).get("configMapRef")
    if ref:
        module_data = _configmap_key(view, ns, ref, "spec.module.configMapRef")
        origin = f"ConfigMap {ns}/{ref.get('name')} key {ref.get('key')}"
    kernels = []
    for i, kernel in enumerate(spec.get("kernels") or []):
        ptx = _configmap_key(view, ns, (kernel or {}).get("configMapRef") or {}, f"spec.kernels[{i}]")
        try:
            text = ptx.decode()
        except UnicodeDecodeError as exc:
            raise InvalidSpec(f"spec.kernels[{i}]: the PTX in ConfigMap {ns}/{_ref_name(kernel)} is not "
                              f"UTF-8 text (byte {exc.start})") from None  # fmt: skip
        kernels.append((str(kernel.get("name", "")), text))
    extra, ignored = _extra_tokens(secret, ns, secret_name)
    return parse_kube_tenant(
        obj,
        token=token,
        module_data=module_data,
        module_origin=origin,
        kernels=tuple(kernels),
        extra_tokens=extra,
        notes=ignored,
    )


def _extra_tokens(
    secret: Mapping[str, bytes], ns: str, secret_name: str
) -> tuple[tuple[tuple[str, str, str], ...], tuple[str, ...]]:
    """The Secret's other token keys: more invoke tokens (rotation) and read-only ones (issue 14),
    as (key, token, scope); and a note for each key ignored because it holds no usable token.

    Only the primary `token` is fail-closed: a bad *extra* key (weak, too long, not UTF-8) is left
    out and named in the tenant's status, and the tenant keeps serving with its other tokens. An
    operator adding one bad rotation key must not take the tenant down (review R2 G7). A key holding
    only whitespace is not a token (no empty header may match it)."""
    extra: list[tuple[str, str, str]] = []
    ignored: list[str] = []
    for key, value in sorted(secret.items()):
        if key == TOKEN_KEY or (scope := token_key_scope(key)) is None or not value.strip():
            continue
        try:
            extra.append((key, _secret_token(value, ns, secret_name, key), scope))
        except InvalidSpec as exc:  # the message names the key, never its value
            ignored.append(f"ignored {exc}")
            log.warning("Ignored a token key of Tenant Secret namespace=%s secret=%s key=%s: %s",
                        ns, secret_name, key, exc)  # fmt: skip
    return tuple(extra), tuple(ignored)


def _ref_name(kernel: Mapping[str, Any] | None) -> str:
    return str(((kernel or {}).get("configMapRef") or {}).get("name", ""))


def _secret_token(value: bytes, ns: str, secret: str, key: str) -> str:
    """One token key of a tenant's Secret, held to the tenants file's rule (tenancy/config.py): UTF-8,
    8 to 4096 characters, no whitespace (surrounding whitespace, as `echo` leaves, is stripped).
    Raises InvalidSpec naming the key: a bad primary refuses its tenant, never the pass (other
    tenants are unaffected); a bad extra key is ignored (`_extra_tokens`)."""
    where = f"Secret {ns}/{secret} key {key!r}"
    try:
        token = value.decode().strip()
    except UnicodeDecodeError as exc:
        raise InvalidSpec(f"{where}: the token is not UTF-8 text (byte {exc.start})") from None
    if not token:
        return ""  # the primary's emptiness has its own message (parse_kube_tenant)
    check_token_strength(token, where)
    return token


def _configmap_key(view: ClusterView, ns: str, ref: Mapping[str, Any], where: str) -> bytes:
    name, key = ref.get("name"), ref.get("key")
    if not name or not key:
        raise InvalidSpec(f"{where}: needs name and key")
    cm = view.configmaps.get(str(name))
    if cm is None:
        raise _Unresolved(CONFIGMAP_MISSING, f"ConfigMap {ns}/{name} not found")
    if key not in cm:
        raise _Unresolved(CONFIGMAP_MISSING, f"ConfigMap {ns}/{name} has no key {key!r}")
    return cm[key]


def readiness_patch(obj: Mapping[str, Any], runtime: Mapping[str, Any], now: str) -> dict[str, Any]:
    """Pure: the phase/conditions/gpuBytesInUse the operator derives once `runtime` is reported.

    Only the keys that change; the operator's own function, so both sides agree on every field
    (lastTransitionTime included: it moves only when a condition's status flips).
    """
    live = dict(obj.get("status") or {})
    status = {**live, "runtime": dict(runtime)}
    tenant = parse_tenant({**obj, "status": status})
    if tenant.shard is None:
        return {}
    desired = desired_status(
        tenant, Placement(tenant.shard), live.get("endpoint"), live.get("tokenSecretName"), now
    )
    return {k: desired[k] for k in READINESS_KEYS if live.get(k) != desired[k]}


def build_runtime_status(shard_name: str, status: TenantStatus) -> dict[str, Any]:
    """status.runtime without reportedAt (compared to decide whether to write)."""
    return {
        "shard": shard_name,
        "observedGeneration": status.generation,
        "loaded": status.loaded,
        "reason": status.reason,
        "message": truncate_message(status.message),
        "gpuBytesInUse": status.gpu_bytes_in_use,
    }


@dataclass
class HandoffBound:
    """When a scale-in's hand-off stops, from what it saw of its tenants: HANDOFF_MIN_S after SIGTERM;
    later for a tenant busy or held at its move barrier: its drain (each invoke and async job ends
    within its timeoutMs) plus HANDOFF_CAPTURE_S for its capture and the target's restore; never
    past `cap_s` (--handoff-max, which the pod's grace period covers). Pure."""

    start: float
    cap_s: float
    until: dict[str, float] = field(default_factory=dict)  # tenant -> when its drain and move should end
    _busy: set[str] = field(default_factory=set)
    _held: set[str] = field(default_factory=set)

    def see(self, name: str, timeout_s: float, held: bool, busy: bool, now: float) -> None:
        """One look at a tenant of this shard. Its first look busy covers the work running then; its
        first look held covers all it will ever run here (a held tenant admits nothing new)."""
        if held and name not in self._held:
            self._held.add(name)
            self._extend(name, now + (timeout_s if busy else 0.0) + HANDOFF_CAPTURE_S)
        elif busy and not held and name not in self._busy:
            self._busy.add(name)
            self._extend(name, now + timeout_s + HANDOFF_CAPTURE_S)

    def _extend(self, name: str, until: float) -> None:
        self.until[name] = max(self.until.get(name, until), until)

    @property
    def deadline(self) -> float:
        return min(self.start + self.cap_s, max([self.start + HANDOFF_MIN_S, *self.until.values()]))

    def why(self) -> str:
        """The bound in words, for the log line of a hand-off that ran out of time."""
        needs = max(self.until.values(), default=0.0)
        if self.deadline < needs:
            return f"the cap (--handoff-max {self.cap_s:.0f}s; Tenants needed {needs - self.start:.0f}s)"
        if needs > self.start + HANDOFF_MIN_S:
            name = max(self.until, key=lambda n: self.until[n])
            return f"Tenant {name}'s timeoutMs plus {HANDOFF_CAPTURE_S:.0f}s for its capture"
        return f"the hand-off's {HANDOFF_MIN_S:.0f}s"


class KubeSource:
    """Keeps the shard equal to the Tenants placed on it, from informer caches of the namespace."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self.namespace = settings.namespace
        self.shard_name = settings.shard_name
        self.kubeconfig = settings.kubeconfig
        self.resync_s = settings.resync_s
        self.missing_grace_s = settings.missing_grace_s
        self.snapshot_dir = settings.snapshot_dir
        self.handoff_max_s = settings.handoff_max_s
        self.clock: Callable[[], float] = time.monotonic  # the hand-off's (tests move it)
        self.handoff_looks = 0  # the hand-off's looks at its tenants (tests wait on it, not on time)
        self._shard: Shard | None = None  # set by run: the hand-off asks it who is held or busy
        self.informers: dict[str, Informer] = {}
        self._agent: SnapshotAgent | None = None
        self._view = ClusterView([])
        self._refs: tuple[set[str], set[str]] = (set(), set())
        self._ours: dict[str, float] = {}  # tenants served here -> monotonic time each became ours
        self._decoded: dict[tuple[str, str, str], dict[str, bytes]] = {}  # (kind, name, rv) -> data
        self._resolved: ResolveMemo = {}
        self._written: dict[str, tuple[str, dict[str, Any]]] = {}  # tenant -> (its rv, runtime sent)
        self._acted: dict[str, str] = {}  # Snapshot uid -> resourceVersion already acted on
        self._live: tuple[float, frozenset[str]] = (0.0, frozenset())
        self._holding: dict[str, str] = {}  # tenant held at its move barrier -> its move Snapshot
        self._left: dict[str, float] = {}  # tenant that moved away -> monotonic time its hold ends
        self._moving_away: set[str] = set()  # of those, the ones whose move is not seen over yet
        self._left_check: asyncio.Task[None] | None = None
        self.left_reads = 0  # Tenants read by name to tell whether their move is over (tests wait on it)
        # Tenants that left the cache after it saw them marked for deletion: a debounced pass may
        # see only the object before and its absence after, as for a move (the field selector).
        self._deleted: set[str] = set()
        self._draining: set[str] = set()  # held tenants a drain watcher waits for
        self._tenant_selector = ""  # set by run
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None  # a pass asked for by _retry_soon
        self._dirty = asyncio.Event()
        self.api: KubeApi | None = None

    async def run(self, shard: Shard, api: KubeApi | None = None) -> None:
        """Serve the Tenants placed here until cancelled; `api` defaults to the configured cluster."""
        self.api = api or await connect(FIELD_MANAGER, self.kubeconfig)
        self._tenant_selector = await self._scoped_tenant_selector()
        if self.snapshot_dir is not None:
            from tensorwasm.runtime.snapshots.kube import SnapshotAgent
            from tensorwasm.runtime.snapshots.store import SnapshotStore

            store = SnapshotStore(self.snapshot_dir)
            self._agent = SnapshotAgent(self.api, store, self.shard_name, shard.accelerator)
            shard.prepare = self._restore
        self._shard = shard
        shard.moving_in = self._moving_here  # a move's Snapshot, never a sleep record, restores it
        self._loop = asyncio.get_running_loop()
        shard.on_load_done = self._mark_dirty  # a load that finishes after its pass gets its own report

        async def live_uids() -> frozenset[str]:
            # Every Tenant of the namespace, not only ours: a sleeper moving here or living on another
            # shard keeps its sleep blob; only blobs of uids no Tenant has are swept (runtime/sleep.py).
            assert self.api is not None
            items, _ = await self.api.list_versioned(resource_path(API_VERSION, PLURAL, self.namespace))
            return frozenset(str((t.get("metadata") or {}).get("uid") or "") for t in items)

        shard.live_uids = live_uids
        shard.namespace = self.namespace  # the sweep judges only sleep keys filed under it
        self.informers = self._informers()
        tasks = [asyncio.create_task(i.run(), name=f"watch-{i.kind}") for i in self.informers.values()]
        try:
            # Serve nothing until every cache holds a full list: a partial view would unload tenants.
            await asyncio.gather(*(i.synced.wait() for i in self.informers.values()))
            took = 0.0
            while True:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
                # that lands as the event fires, and this loop would then never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.resync_s):
                        await self._dirty.wait()
                # Let a burst of events settle into one pass; under a long burst (500 Tenants
                # placed at once) wait as long as the last pass used CPU (this process's, loads and
                # informers included), so passes use at most about half a core and leave the rest
                # to the API server and the operator. Not its wall time: a pass mostly waiting on
                # its status writes is no reason to make the next tenants wait.
                await asyncio.sleep(max(_DEBOUNCE_S, took))
                self._dirty.clear()
                started = time.process_time()
                try:
                    await self.reconcile(shard)
                except Exception as exc:  # API server away: keep serving what we have, retry
                    log.warning("Failed reconciling Tenants, retrying: %s", exc)
                    await asyncio.sleep(1.0)
                    self._dirty.set()
                took = min(time.process_time() - started, 1.0)
        finally:
            for task in tasks:
                task.cancel()
            if self._left_check is not None:
                self._left_check.cancel()
            if self._retry is not None:
                self._retry.cancel()
            if api is None:
                await self.api.close()

    async def hand_off(self) -> int:
        """On SIGTERM, while still serving: wait until the operator moved every tenant of this shard
        away (a scale-in), bounded as HANDOFF_* and `HandoffBound` say; the number of tenants handed off."""
        tenants = self.informers.get(PLURAL)
        if tenants is None or not tenants.synced.is_set():
            return 0

        def ours() -> dict[str, dict[str, Any]]:
            return {
                n: t
                for n, t in tenants.items().items()
                if (t.get("status") or {}).get("shard") == self.shard_name
                and not (t.get("metadata") or {}).get("deletionTimestamp")
            }

        # Only departures from now on count: a tenant that moved away before SIGTERM says nothing
        # about a scale-in (counting it kept a restarting shard waiting HANDOFF_MIN_S).
        remaining = initial = ours()
        # The bound counts from SIGTERM (this call follows it within a loop turn), not from after
        # the replicas GET: the pod's grace period counts from SIGTERM, and a slow API server
        # could otherwise spend the margin after the hand-off (desired/shards.py's arithmetic).
        start = self.clock()
        if not await self._scaled_in():
            return 0
        asked = self.clock()  # the start wait counts from the answer: a slow GET is no restart
        bound = HandoffBound(start, self.handoff_max_s)
        handed: set[str] = set()

        def departed() -> set[str]:
            """Ours at SIGTERM, gone from here since, and not deleted: moved (also a move that went
            straight to Restoring between two looks: policies without a capture)."""
            gone = initial.keys() - remaining.keys() - self._deleted
            return {
                n for n in gone if not ((tenants.get(n) or {}).get("metadata") or {}).get("deletionTimestamp")
            }

        def look() -> bool:
            """Note who is held or busy now (the bound may grow); whether the hand-off has time left."""
            self.handoff_looks += 1
            now = self.clock()
            self._show_bound(bound, initial.keys(), now)
            return now < bound.deadline

        while remaining and look():
            moves = {n: (t.get("status") or {}).get("move") or {} for n, t in remaining.items()}
            handed |= {n for n, m in moves.items() if m.get("source") == self.shard_name} | departed()
            if not handed and self.clock() - asked >= HANDOFF_START_S:
                return 0  # nobody moves our tenants: a restart (upgrade, eviction), not a scale-in
            await asyncio.sleep(0.1)
            remaining = ours()
        handed |= departed()
        if remaining:
            # The shard stops next: their running invokes and jobs are interrupted, and a move not
            # captured yet goes on without its capture (the operator's MovedWithoutCapture Event).
            log.warning(
                "Stopped handing off Tenants after %.0fs, %s remaining=%s; the shard stops, interrupting "
                "their running work, and a move not captured yet goes on without its capture",
                self.clock() - start,
                bound.why(),
                ",".join(sorted(remaining)),
            )

        # Gone from here is not served there: the Services select this pod until each target reports
        # the tenant loaded (its move over), and meanwhile this shard answers "moving" for it. (Until
        # a pass saw it leave, it is still in _ours.)
        def moving() -> set[str]:
            return {n for n in handed if n in self._ours or n in self._moving_away}

        while moving() and look():
            await asyncio.sleep(0.1)
        if unfinished := moving() - remaining.keys():  # (those still here were named above)
            log.warning(
                "Stopped waiting for moves to end after %.0fs, %s remaining=%s",
                self.clock() - start,
                bound.why(),
                ",".join(sorted(unfinished)),
            )
        if handed:
            log.info(
                "Handed off Tenants count=%d after %.0fs; answering 'moving' %.0fs more",
                len(handed),
                self.clock() - start,
                HANDOFF_LINGER_S,
            )
            await asyncio.sleep(HANDOFF_LINGER_S)
        return len(handed)

    def _show_bound(self, bound: HandoffBound, names: Iterable[str], now: float) -> None:
        """Tell the hand-off's bound which of `names` are busy or held now, with their timeouts."""
        shard = self._shard
        if shard is None:
            return
        for name in names:
            served = shard.served.get(name)
            if served is not None:
                timeout_s = served.config.limits.timeout_ms / 1000
                bound.see(name, timeout_s, name in shard.holds, not shard.drained(name), now)

    async def _scaled_in(self) -> bool:
        """This shard's ordinal is beyond its StatefulSet's replicas; True when that cannot be read
        (then the HANDOFF_START_S wait tells a scale-in from a restart)."""
        prefix, _, ordinal = self.shard_name.rpartition("-")
        if not prefix or not ordinal.isdigit() or self.api is None:
            return True
        try:
            # Bounded by the start wait: the hand-off's clock runs meanwhile (the client's own
            # timeout, 30 s, would spend the hand-off's time on one GET).
            sts = await asyncio.wait_for(
                self.api.get(resource_path("apps/v1", "statefulsets", self.namespace, prefix)),
                HANDOFF_START_S,
            )
        except (TimeoutError, KubeError, aiohttp.ClientError) as exc:
            log.info("Found no StatefulSet replicas to tell a scale-in (%s); waiting for moves instead",
                     str(exc) or type(exc).__name__)  # fmt: skip
            return True
        if sts is None:
            return True
        replicas = int((sts.get("spec") or {}).get("replicas") or 0)
        return int(ordinal) >= replicas

    def _informers(self) -> dict[str, Informer]:
        assert self.api is not None
        ns = self.namespace
        kinds: dict[str, tuple[str, dict[str, str]]] = {
            PLURAL: (resource_path(API_VERSION, PLURAL, ns),
                     {"fieldSelector": self._tenant_selector} if self._tenant_selector else {}),
            CONFIGMAPS: (resource_path("v1", CONFIGMAPS, ns), {}),
            # Helm release records are the largest Secrets in a chart's namespace and never a token.
            SECRETS: (resource_path("v1", SECRETS, ns), {"fieldSelector": "type!=helm.sh/release.v1"}),
        }  # fmt: skip
        if self._agent is not None:
            kinds[SNAPSHOTS] = (resource_path(API_VERSION, SNAPSHOTS, ns), {})
        relist_s = max(self.resync_s, _RELIST_S)
        return {
            kind: Informer(kind, self.api, path, self._on_change(kind), relist_s, params)
            for kind, (path, params) in kinds.items()
        }

    def _on_change(self, kind: str) -> Callable[[dict[str, Any] | None, dict[str, Any] | None], None]:
        def changed(old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
            relisted = old is None and new is None
            gone = (old.get("metadata") or {}) if old and new is None and kind == PLURAL else {}
            if gone.get("deletionTimestamp"):
                self._deleted.add(str(gone["name"]))
            if relisted or any(self._concerns_us(kind, o) for o in (old, new) if o):
                self._mark_dirty()

        return changed

    def _mark_dirty(self) -> None:
        self._dirty.set()

    async def reconcile(self, shard: Shard) -> None:
        before = {t["metadata"]["name"]: t for t in self._view.tenants}
        view = self._view = self._build_view()
        deleted = self._move_barrier(shard, before, view)
        configs, failed = resolve_tenants(view, self._resolved)
        # Wait for this pass's loads (one status write per tenant), but never for long: a slow or
        # stuck load is reported Loading, and its end triggers a pass of its own (on_load_done).
        await shard.sync(configs, failed, wait=LOAD_WAIT_S, deleted=deleted)
        reports = {}
        now, deferred = time.monotonic(), False
        for obj in view.tenants:
            name = obj["metadata"]["name"]
            status = shard.status(name)
            if status is None:
                continue
            if status.reason in _MAYBE_IN_FLIGHT and now - self._ours[name] < self.missing_grace_s:
                deferred = True
                continue
            reports[name] = (obj, build_runtime_status(self.shard_name, status))
        if deferred and self._loop is not None:
            self._loop.call_later(self.missing_grace_s, self._mark_dirty)
        # One line per pass at DEBUG: what tests (and a curious operator) wait on instead of time.
        log.debug(
            "Passed over Tenants ours=%d reports=%d deferred=%s", len(view.tenants), len(reports), deferred
        )
        if any(self._needs_write(obj, runtime) for obj, runtime in reports.values()):
            await self._write_statuses(reports)
        if self._agent is not None:
            await self._reconcile_snapshots(shard)

    def _move_barrier(
        self, shard: Shard, before: Mapping[str, Mapping[str, Any]], view: ClusterView
    ) -> set[str]:
        """Hold tenants at their move barrier, keep answering for those that left, release the rest;
        the tenants that left because their Tenant was deleted (only their sleep state goes with them).

        Runs before `Shard.sync`, so a tenant that leaves is still served when it is held."""
        now = time.monotonic()
        gone: set[str] = set()
        ours = {t["metadata"]["name"]: t for t in view.tenants}
        for name, obj in ours.items():
            move = (obj.get("status") or {}).get("move") or {}
            if move.get("phase") == HOLDING and move.get("source") == self.shard_name:
                if shard.hold(name):
                    self._holding[name] = str(move.get("snapshot") or "")
                    self._watch_drain(shard, name)
            elif name in self._holding or name in self._left:  # rolled back, or moved back here
                self._holding.pop(name, None)
                self._left.pop(name, None)
                self._moving_away.discard(name)
                shard.release(name)
        self._deleted -= ours.keys()  # created again since
        for name, last in before.items():
            if name in ours or name in self._left:
                continue
            current = self.informers[PLURAL].get(name)
            deleted = name in self._deleted or any(
                (o.get("metadata") or {}).get("deletionTimestamp") for o in (last, current) if o
            )
            self._deleted.discard(name)
            self._holding.pop(name, None)
            if deleted:
                gone.add(name)
            if not deleted and shard.hold(name):
                self._left[name] = now + MOVED_MAX_S
                self._moving_away.add(name)
                self._watch_left()
                log.info("Moved away Tenant name=%s; answering 'moving' until its move is over", name)
            else:
                shard.release(name)
        for name in [n for n, until in self._left.items() if until <= now]:
            del self._left[name]
            self._moving_away.discard(name)
            shard.release(name)
        if self._left and self._loop is not None:
            self._loop.call_at(self._loop.time() + max(0.0, min(self._left.values()) - now), self._mark_dirty)
        return gone

    def _watch_left(self) -> None:
        """Read the Tenants that moved away by name until each one's move is over: this shard's
        watch no longer shows them (the status.shard field selector)."""
        if self._left_check is None or self._left_check.done():
            self._left_check = asyncio.get_running_loop().create_task(self._check_left(), name="moved-away")

    async def _check_left(self) -> None:
        assert self.api is not None
        while self._moving_away:
            names = sorted(self._moving_away)
            await asyncio.sleep(max(_LEFT_CHECK_S, len(names) / _LEFT_CHECKS_PER_S))
            for name in names:
                if name not in self._moving_away:
                    continue
                try:
                    obj = await self.api.get(resource_path(API_VERSION, PLURAL, self.namespace, name))
                except Exception as exc:  # API server away (or slow): keep answering moving, ask again
                    log.info("Found no Tenant to tell whether its move is over name=%s: %s", name, exc)
                    continue
                self.left_reads += 1
                move = ((obj or {}).get("status") or {}).get("move") or {}
                if obj is not None and move.get("source") == self.shard_name:
                    continue  # still moving away from here: the Service may still select this shard
                self._moving_away.discard(name)
                if name in self._left:
                    self._left[name] = min(self._left[name], time.monotonic() + MOVED_LINGER_S)
                    log.info("Moved away Tenant name=%s: its move is over; answering 'moving' %.0fs more",
                             name, MOVED_LINGER_S)  # fmt: skip
                    self._mark_dirty()  # the pass schedules the release

    def _watch_drain(self, shard: Shard, name: str) -> None:
        """A pass once the held tenant's in-flight invokes are done (its capture may go then)."""
        tenant = shard.served.get(name)
        if tenant is None or name in self._draining or shard.drained(name):
            return
        self._draining.add(name)

        async def drained() -> None:
            try:
                await tenant.queue.drain()
            finally:
                self._draining.discard(name)
                self._mark_dirty()

        asyncio.get_running_loop().create_task(drained(), name=f"drain-{name}")

    def _build_view(self) -> ClusterView:
        """Our Tenants and what they reference, from the caches (no API call)."""
        tenants = self.informers[PLURAL].items()
        # A Tenant being deleted is not served: it goes now, not once its finalizer is released
        # (deletion bumps its generation, and reloading it for that would race the operator).
        ours = [
            t
            for t in tenants.values()
            if (t.get("status") or {}).get("shard") == self.shard_name
            and not (t.get("metadata") or {}).get("deletionTimestamp")
        ]
        view = ClusterView(ours)
        cms: set[str] = set()
        secrets: set[str] = set()
        for t in ours:
            c, s = referenced(t)
            cms |= c
            secrets |= s
        now = time.monotonic()
        self._refs = (cms, secrets)
        self._ours = {t["metadata"]["name"]: self._ours.get(t["metadata"]["name"], now) for t in ours}
        view.configmaps = self._decode(CONFIGMAPS, cms, view.versions)
        view.secrets = self._decode(SECRETS, secrets, view.versions)
        if SNAPSHOTS in self.informers:
            view.snapshots = list(self.informers[SNAPSHOTS].items().values())
        return view

    def _decode(self, kind: str, names: set[str], versions: dict[str, str]) -> dict[str, dict[str, bytes]]:
        """name -> key -> bytes for the named objects present; decoded once per resourceVersion.

        Records each one's resourceVersion in `versions` ("kind/name")."""
        out: dict[str, dict[str, bytes]] = {}
        keep: set[tuple[str, str, str]] = set()
        for name in names:
            obj = self.informers[kind].get(name)
            if obj is None:
                continue
            memo = (kind, name, str(obj["metadata"].get("resourceVersion", "")))
            versions[f"{kind}/{name}"] = memo[2]
            keep.add(memo)
            data = self._decoded.get(memo)
            if data is None:
                if kind == CONFIGMAPS:
                    data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
                    data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
                else:
                    data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
                self._decoded[memo] = data
            out[name] = data
        for memo in [m for m in self._decoded if m[0] == kind and m not in keep]:
            del self._decoded[memo]  # superseded versions and objects no Tenant here references
        return out

    async def _snapshot_jobs(self, shard: Shard) -> list[tuple[dict[str, Any], TenantHandle | None]]:
        """The Snapshots this shard acts on now: captures of tenants served here, and deletions."""
        from tensorwasm.runtime.snapshots.kube import blob_deleter, needs_capture

        jobs: list[tuple[dict[str, Any], TenantHandle | None]] = []
        for snap in self._view.snapshots:
            meta = snap.get("metadata") or {}
            if self._acted.get(str(meta.get("uid"))) == meta.get("resourceVersion"):
                continue  # acted on this version already; its update is on the way through the watch
            tenant = _snapshot_tenant(snap)
            if meta.get("deletionTimestamp"):
                if SNAPSHOT_BLOB_FINALIZER not in (meta.get("finalizers") or []):
                    continue
                if blob_deleter(snap, await self._live_shards()) == self.shard_name:
                    jobs.append((snap, None))
            elif tenant in self._ours and needs_capture(snap):
                purpose = (meta.get("labels") or {}).get(LABEL_PURPOSE)
                if purpose == MOVE_PURPOSE and not (
                    self._holding.get(tenant) == meta.get("name") and shard.drained(tenant)
                ):
                    continue  # only at the barrier: held and drained, so no later write is lost
                try:
                    await shard.wake(tenant)  # a sleeping tenant's Snapshot captures its live state
                except Exception as exc:  # no GPU room now, a failed wake: the others go on
                    log.warning("Deferred capturing Snapshot name=%s: Tenant %s cannot wake: %s",
                                meta.get("name"), tenant, exc)  # fmt: skip
                    self._retry_soon(_WAKE_RETRY_S)
                    continue
                handle = self._handle(shard.served.get(tenant))
                if handle is not None:
                    jobs.append((snap, handle))
        live = {str((s.get("metadata") or {}).get("uid")) for s in self._view.snapshots}
        self._acted = {uid: rv for uid, rv in self._acted.items() if uid in live}
        return jobs

    def _retry_soon(self, delay: float) -> None:
        """One pass `delay` from now, however many things ask for it meanwhile."""
        if self._retry is not None or self._loop is None:
            return

        def fire() -> None:
            self._retry = None
            self._mark_dirty()

        self._retry = self._loop.call_later(delay, fire)

    async def _live_shards(self) -> frozenset[str]:
        """Shards whose pod (`<prefix>-<n>`, not being deleted) exists; always this one.

        Listed only when a deleted Snapshot needs an arbiter, and then at most every few seconds.
        """
        at, live = self._live
        if time.monotonic() - at < _LIVE_TTL_S:
            return live
        names = {self.shard_name}
        prefix, _, ordinal = self.shard_name.rpartition("-")
        if prefix and ordinal.isdigit():
            pattern = re.compile(rf"{re.escape(prefix)}-\d+")
            assert self.api is not None
            for pod in await self.api.list(resource_path("v1", "pods", self.namespace)):
                meta = pod.get("metadata") or {}
                if pattern.fullmatch(str(meta.get("name", ""))) and not meta.get("deletionTimestamp"):
                    names.add(str(meta["name"]))
        self._live = (time.monotonic(), frozenset(names))
        log.debug("Listed shard pods live=%s", ",".join(sorted(names)))
        return self._live[1]

    async def _restore(
        self, config: TenantConfig, pool: TenantInstancePool, device: TenantDevice | None
    ) -> str:
        """Shard.prepare: restore a starting tenant's Snapshot before it serves; a note for its status."""
        obj = next((t for t in self._view.tenants if t["metadata"]["name"] == config.name), None)
        if self._agent is None or obj is None or not config.uid:
            return ""
        from tensorwasm.runtime.snapshots.kube import TenantHandle

        move = (obj.get("status") or {}).get("move") or {}
        handle = TenantHandle(config.name, config.uid, config.module.sha256, config.generation, pool, device)
        if move.get("target") == self.shard_name and move.get("snapshot"):
            return await self._move_restore(handle, obj, str(move["snapshot"]))
        result, why = await asyncio.to_thread(self._agent.restore_on_start, handle, obj, self._view.snapshots)
        if result is not None:
            return why
        return "" if why == "no Ready snapshot" else f"not restored: {why}"

    def _moving_here(self, config: TenantConfig) -> bool:
        """Shard.moving_in: status.move names this shard as the target, with a Snapshot to restore."""
        obj = next((t for t in self._view.tenants if t["metadata"]["name"] == config.name), None)
        move = ((obj or {}).get("status") or {}).get("move") or {}
        return move.get("target") == self.shard_name and bool(move.get("snapshot"))

    async def _move_restore(self, handle: TenantHandle, obj: dict[str, Any], snapshot: str) -> str:
        """A move target restores exactly the move's Snapshot, or does not serve: the source gave the
        tenant up after capturing it, so fresh (or older) state would silently lose every write.
        Refused, the tenant is reported not loaded (MoveRestoreFailed), the operator's move timeout
        rolls the move back to the source, and each pass here tries again meanwhile (a signing key
        that reaches this shard late, a Snapshot our watch has not shown Ready yet)."""
        from tensorwasm.api.snapshot import READY, phase_of

        assert self._agent is not None
        # The operator saw it Ready; our watch may trail by a moment.
        deadline = time.monotonic() + _MOVE_RESTORE_WAIT_S
        found = None
        while time.monotonic() < deadline:
            found = self.informers[SNAPSHOTS].get(snapshot) if SNAPSHOTS in self.informers else None
            if found is not None and phase_of(found) == READY:
                break
            await asyncio.sleep(0.05)
        else:
            state = (
                f"is {phase_of(found) or 'not finished'}"
                if found is not None
                else "is not in this shard's cache"
            )
            raise PrepareRefused(MOVE_RESTORE_FAILED, f"move Snapshot {snapshot} {state} after "
                                 f"{_MOVE_RESTORE_WAIT_S:.0f}s; not serving older state")  # fmt: skip
        self._view.snapshots = list(self.informers[SNAPSHOTS].items().values())
        exact = {**obj, "spec": {**(obj.get("spec") or {}), "restoreFrom": snapshot}}
        try:
            result, why = await asyncio.to_thread(
                self._agent.restore_on_start, handle, exact, self._view.snapshots
            )
        except Exception as exc:  # GPU room, I/O: the same verdict as a refused blob
            result, why = None, f"{type(exc).__name__}: {exc}"
        if result is None:
            log.warning("Failed restoring the move Snapshot of Tenant name=%s snapshot=%s: %s",
                        handle.name, snapshot, why)  # fmt: skip
            raise PrepareRefused(MOVE_RESTORE_FAILED, f"move Snapshot {snapshot} not restored: {why}")
        return why

    def _handle(self, tenant: ServedTenant | None) -> TenantHandle | None:
        if tenant is None or not tenant.config.uid:
            return None
        from tensorwasm.runtime.snapshots.kube import TenantHandle

        cfg = tenant.config
        return TenantHandle(cfg.name, cfg.uid, cfg.module.sha256, cfg.generation, tenant.pool, tenant.device)

    async def _reconcile_snapshots(self, shard: Shard) -> None:
        assert self._agent is not None
        for snapshot, handle in await self._snapshot_jobs(shard):
            meta = snapshot["metadata"]
            try:
                await self._agent.reconcile(snapshot, handle)
            except Exception as exc:  # one Snapshot's trouble (API conflict, disk) must not stop the rest
                log.warning("Failed reconciling Snapshot name=%s: %s", meta.get("name"), exc)
                continue
            self._acted[str(meta.get("uid"))] = str(meta.get("resourceVersion"))

    # --- API calls ---

    async def _scoped_tenant_selector(self) -> str:
        """`status.shard=<this shard>` where the Tenant CRD declares it selectable (Kubernetes 1.31+,
        crds/): this shard then watches and caches only its own Tenants, not every Tenant of the
        namespace. Else "" (all Tenants; the pass filters them)."""
        assert self.api is not None
        selector = f"status.shard={self.shard_name}"
        try:
            await self.api.list_versioned(
                resource_path(API_VERSION, PLURAL, self.namespace), {"fieldSelector": selector, "limit": "1"}
            )
        except KubeError as exc:
            if exc.status != 400:  # 400: field label not supported (an older CRD or API server)
                raise
            log.warning("Watching every Tenant: the API server cannot select them on status.shard")
            return ""
        return selector

    def _needs_write(self, obj: Mapping[str, Any], runtime: Mapping[str, Any]) -> bool:
        """Level-triggered and quiet: write only a report that differs from the Tenant's, once per version."""
        current = dict((obj.get("status") or {}).get("runtime") or {})
        current.pop("reportedAt", None)
        if current == runtime:
            return False
        version = str((obj.get("metadata") or {}).get("resourceVersion", ""))
        return self._written.get(obj["metadata"]["name"]) != (version, runtime)

    async def _write_statuses(self, reports: Mapping[str, tuple[dict[str, Any], dict[str, Any]]]) -> None:
        assert self.api is not None
        now = now_rfc3339()
        for name in [n for n in self._written if n not in reports]:
            del self._written[name]
        for name, (obj, runtime) in reports.items():
            if not self._needs_write(obj, runtime):
                continue
            report = {**runtime, "reportedAt": now}
            body = {"status": {"runtime": report, **readiness_patch(obj, report, now)}}
            path = resource_path(API_VERSION, PLURAL, self.namespace, name, "status")
            try:
                await self.api.merge_patch(path, body, want_body=False)  # the watch brings the new version
            except (KubeError, aiohttp.ClientError) as exc:
                # Deleted or moved meanwhile, or the API server failing: a pass soon settles it
                # (not only the next resync: a report lost now would leave the Tenant Placed).
                log.warning("Failed writing Tenant status name=%s: %s", name, exc)
                if self._loop is not None:
                    self._loop.call_later(_WRITE_RETRY_S, self._mark_dirty)
                continue
            # Until the watch brings the new version, the cache still shows the old report.
            self._written[name] = (str(obj["metadata"].get("resourceVersion", "")), runtime)
            log.info(
                "Reported Tenant status name=%s loaded=%s reason=%s",
                name,
                runtime["loaded"],
                runtime["reason"],
            )

    def _concerns_us(self, kind: str, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        if kind == SNAPSHOTS:
            return _snapshot_tenant(obj) in self._ours or bool(meta.get("deletionTimestamp"))
        if kind == PLURAL:  # ours now, or ours until this change (moved away, or being deleted)
            return (obj.get("status") or {}).get("shard") == self.shard_name or meta.get("name") in self._ours
        cms, secrets = self._refs
        return meta.get("name") in (cms if kind == CONFIGMAPS else secrets)


def _snapshot_tenant(snapshot: Mapping[str, Any]) -> str:
    return str((snapshot.get("spec") or {}).get("tenant", ""))
