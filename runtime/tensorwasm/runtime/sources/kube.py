"""The Kubernetes tenant source: the Tenants placed on this shard, their Secrets and ConfigMaps.

Owns `KubeSource` and the pure `resolve_tenants`. Level-triggered like a kubelet: any watch event
that concerns this shard (a Tenant whose status.shard is ours or was ours, or a ConfigMap/Secret
one of our Tenants references) only marks the state dirty; the reconcile then re-lists everything,
hands the desired set to `Shard.sync`, and writes `status.runtime` through the status subresource
for each Tenant whose report changed (a merge patch of that key only: the operator owns the rest).
A restart re-lists and converges; nothing depends on seeing an event exactly once. A periodic
re-list (--resync) also refreshes gpuBytesInUse.
With --snapshot-dir it also drives the snapshot agent (snapshots/kube.py): a Tenant that starts
here restores its chosen Snapshot before it serves (through `Shard.prepare`), and every Snapshot
of a tenant served here is captured or, when deleted, has its blob removed.
The `kubernetes` client is blocking: every call runs in a worker thread, never on the event loop.
Must not import wasmtime, cuda or aiohttp.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tensorwasm.runtime.settings import RuntimeSettings
from tensorwasm.runtime.shard import ServedTenant, Shard, TenantStatus
from tensorwasm.runtime.tenancy.config import TenantConfig, TenantConfigError, parse_kube_tenant

if TYPE_CHECKING:
    from tensorwasm.runtime.accel.base import TenantDevice
    from tensorwasm.runtime.engine import TenantInstancePool
    from tensorwasm.runtime.snapshots.kube import SnapshotAgent, TenantHandle

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "tensorwasm.io", "v1alpha1", "tenants"
SNAPSHOTS = "snapshots"
SECRET_MISSING = "SecretMissing"


def token_secret_name(tenant_name: str, spec: Mapping[str, Any]) -> str:
    """spec.authSecretRef.name, else the Secret the operator creates: part of the Tenant API."""
    return str((spec.get("authSecretRef") or {}).get("name") or f"tw-{tenant_name}-token")
CONFIGMAP_MISSING = "ConfigMapMissing"
_WATCH_TIMEOUT_S = 300
_DEBOUNCE_S = 0.05


@dataclass
class ClusterView:
    """What one re-list saw: our Tenants plus the ConfigMaps and Secrets they reference."""

    tenants: list[dict[str, Any]]
    configmaps: dict[str, dict[str, bytes]] = field(default_factory=dict)  # name -> key -> bytes
    secrets: dict[str, dict[str, bytes]] = field(default_factory=dict)
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # only with a snapshot agent


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
    return cms, {token_secret_name(name, spec)}


def resolve_tenants(view: ClusterView) -> tuple[list[TenantConfig], dict[str, TenantStatus]]:
    """Pure: turn a re-list into configs for the shard, and refusals for what cannot be resolved."""
    configs: list[TenantConfig] = []
    failed: dict[str, TenantStatus] = {}
    for obj in view.tenants:
        meta = obj.get("metadata") or {}
        name, generation = str(meta.get("name", "")), int(meta.get("generation") or 0)
        try:
            configs.append(_resolve_one(obj, view))
        except _Unresolved as exc:
            failed[name] = TenantStatus(False, exc.reason, exc.message, generation)
        except TenantConfigError as exc:
            failed[name] = TenantStatus(False, exc.reason, str(exc), generation)
    return configs, failed


class _Unresolved(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def _resolve_one(obj: Mapping[str, Any], view: ClusterView) -> TenantConfig:
    spec = obj.get("spec") or {}
    ns = (obj.get("metadata") or {}).get("namespace", "")
    secret_name = token_secret_name(str((obj.get("metadata") or {}).get("name", "")), spec)
    secret = view.secrets.get(secret_name)
    if secret is None:
        raise _Unresolved(SECRET_MISSING, f"Secret {ns}/{secret_name} not found")
    if "token" not in secret:
        raise _Unresolved(SECRET_MISSING, f"Secret {ns}/{secret_name} has no 'token' key")
    token = secret["token"].decode().strip()
    module_data, origin = None, ""
    ref = (spec.get("module") or {}).get("configMapRef")
    if ref:
        module_data = _configmap_key(view, ns, ref, "spec.module.configMapRef")
        origin = f"ConfigMap {ns}/{ref.get('name')} key {ref.get('key')}"
    kernels = []
    for i, kernel in enumerate(spec.get("kernels") or []):
        ptx = _configmap_key(view, ns, (kernel or {}).get("configMapRef") or {}, f"spec.kernels[{i}]")
        kernels.append((str(kernel.get("name", "")), ptx.decode()))
    return parse_kube_tenant(
        obj, token=token, module_data=module_data, module_origin=origin, kernels=tuple(kernels)
    )


def _configmap_key(view: ClusterView, ns: str, ref: Mapping[str, Any], where: str) -> bytes:
    name, key = ref.get("name"), ref.get("key")
    if not name or not key:
        raise TenantConfigError(f"{where}: needs name and key")
    cm = view.configmaps.get(str(name))
    if cm is None:
        raise _Unresolved(CONFIGMAP_MISSING, f"ConfigMap {ns}/{name} not found")
    if key not in cm:
        raise _Unresolved(CONFIGMAP_MISSING, f"ConfigMap {ns}/{name} has no key {key!r}")
    return cm[key]


def build_runtime_status(shard_name: str, status: TenantStatus) -> dict[str, Any]:
    """status.runtime without reportedAt (compared to decide whether to write)."""
    return {
        "shard": shard_name,
        "observedGeneration": status.generation,
        "loaded": status.loaded,
        "reason": status.reason,
        "message": status.message[:1024],
        "gpuBytesInUse": status.gpu_bytes_in_use,
    }


class KubeSource:
    """Watches the API server and keeps the shard equal to the Tenants placed on it."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self.namespace = settings.namespace
        self.shard_name = settings.shard_name
        self.kubeconfig = settings.kubeconfig
        self.resync_s = settings.resync_s
        self.snapshot_dir = settings.snapshot_dir
        self._agent: SnapshotAgent | None = None
        self._view = ClusterView([])
        self._refs: tuple[set[str], set[str]] = (set(), set())
        self._ours: set[str] = set()
        self._stop = threading.Event()
        self._core: Any = None
        self._custom: Any = None

    async def run(self, shard: Shard) -> None:
        await asyncio.to_thread(self._connect)
        kinds = ["tenants", "configmaps", "secrets"]
        if self.snapshot_dir is not None:
            from tensorwasm.runtime.snapshots.kube import SnapshotAgent
            from tensorwasm.runtime.snapshots.store import SnapshotStore

            store = SnapshotStore(self.snapshot_dir)
            self._agent = SnapshotAgent(self._custom, store, self.shard_name, shard.accelerator)
            shard.prepare = self._restore
            kinds.append(SNAPSHOTS)
        loop = asyncio.get_running_loop()
        dirty = asyncio.Event()
        dirty.set()  # the first pass is a full list
        threads = [
            threading.Thread(target=self._watch, args=(kind, loop, dirty), name=f"watch-{kind}", daemon=True)
            for kind in kinds
        ]
        for t in threads:
            t.start()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(dirty.wait(), self.resync_s)
                await asyncio.sleep(_DEBOUNCE_S)  # let a burst of events settle into one pass
                dirty.clear()
                try:
                    await self.reconcile(shard)
                except Exception as exc:  # API server away: keep serving what we have, retry
                    log.warning("Failed re-listing Tenants, retrying: %s", exc)
                    await asyncio.sleep(1.0)
                    dirty.set()
        finally:
            self._stop.set()

    async def reconcile(self, shard: Shard) -> None:
        view = self._view = await asyncio.to_thread(self._list)
        configs, failed = resolve_tenants(view)
        await shard.sync(configs, failed)
        reports = {}
        for obj in view.tenants:
            name = obj["metadata"]["name"]
            status = shard.status(name)
            if status is not None:
                reports[name] = (obj, build_runtime_status(self.shard_name, status))
        await asyncio.to_thread(self._write_statuses, reports)
        if self._agent is not None:
            jobs = [(snap, self._handle(shard.served.get(_snapshot_tenant(snap)))) for snap in view.snapshots]
            await asyncio.to_thread(self._reconcile_snapshots, jobs)

    async def _restore(
        self, config: TenantConfig, pool: TenantInstancePool, device: TenantDevice | None
    ) -> str:
        """Shard.prepare: restore a starting tenant's Snapshot before it serves; a note for its status."""
        obj = next((t for t in self._view.tenants if t["metadata"]["name"] == config.name), None)
        if self._agent is None or obj is None or not config.uid:
            return ""
        from tensorwasm.runtime.snapshots.kube import TenantHandle

        handle = TenantHandle(config.name, config.uid, config.module.sha256, config.generation, pool, device)
        result, why = await asyncio.to_thread(self._agent.restore_on_start, handle, obj, self._view.snapshots)
        if result is not None:
            return why
        return "" if why == "no Ready snapshot" else f"not restored: {why}"

    def _handle(self, tenant: ServedTenant | None) -> TenantHandle | None:
        if tenant is None or not tenant.config.uid:
            return None
        from tensorwasm.runtime.snapshots.kube import TenantHandle

        cfg = tenant.config
        return TenantHandle(cfg.name, cfg.uid, cfg.module.sha256, cfg.generation, tenant.pool, tenant.device)

    def _reconcile_snapshots(self, jobs: list[tuple[dict[str, Any], TenantHandle | None]]) -> None:
        assert self._agent is not None
        for snapshot, handle in jobs:
            try:
                self._agent.reconcile(snapshot, handle)
            except Exception as exc:  # one Snapshot's trouble (API conflict, disk) must not stop the rest
                log.warning("Failed reconciling Snapshot name=%s: %s", snapshot["metadata"].get("name"), exc)

    # --- blocking API calls (worker threads) ---

    def _connect(self) -> None:
        from kubernetes import client
        from kubernetes import config as untyped_config

        config: Any = untyped_config  # the client ships no type hints
        if self.kubeconfig is not None:
            api = config.new_client_from_config(config_file=str(self.kubeconfig))
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api = client.ApiClient()
        self._core = client.CoreV1Api(api)
        self._custom = client.CustomObjectsApi(api)

    def _list(self) -> ClusterView:
        from kubernetes.client.exceptions import ApiException

        listed = self._custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        ours = [t for t in listed.get("items", []) if (t.get("status") or {}).get("shard") == self.shard_name]
        view = ClusterView(ours)
        cms: set[str] = set()
        secrets: set[str] = set()
        for t in ours:
            c, s = referenced(t)
            cms |= c
            secrets |= s
        self._refs, self._ours = (cms, secrets), {t["metadata"]["name"] for t in ours}
        if self._agent is not None:
            snaps = self._custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, SNAPSHOTS)
            view.snapshots = [s for s in snaps.get("items", []) if _snapshot_tenant(s) in self._ours
                              or (s.get("metadata") or {}).get("deletionTimestamp")]  # fmt: skip
        for name in cms:
            try:
                cm = self._core.read_namespaced_config_map(name, self.namespace)
            except ApiException as exc:
                if exc.status == 404:
                    continue
                raise
            data = {k: v.encode() for k, v in (cm.data or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (cm.binary_data or {}).items()})
            view.configmaps[name] = data
        for name in secrets:
            try:
                secret = self._core.read_namespaced_secret(name, self.namespace)
            except ApiException as exc:
                if exc.status == 404:
                    continue
                raise
            view.secrets[name] = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        return view

    def _write_statuses(self, reports: Mapping[str, tuple[dict[str, Any], dict[str, Any]]]) -> None:
        from kubernetes.client.exceptions import ApiException

        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for name, (obj, runtime) in reports.items():
            current = dict((obj.get("status") or {}).get("runtime") or {})
            current.pop("reportedAt", None)
            if current == runtime:
                continue  # level-triggered, and quiet: no write when nothing changed
            body = {"status": {"runtime": {**runtime, "reportedAt": now}}}
            try:
                self._custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    name,
                    body,
                    _content_type="application/merge-patch+json",
                )
            except ApiException as exc:  # deleted or moved meanwhile: the next pass settles it
                log.warning("Failed writing Tenant status name=%s status=%s", name, exc.status)
                continue
            log.info(
                "Reported Tenant status name=%s loaded=%s reason=%s",
                name,
                runtime["loaded"],
                runtime["reason"],
            )

    def _watch(self, kind: str, loop: asyncio.AbstractEventLoop, dirty: asyncio.Event) -> None:
        from kubernetes import watch as untyped_watch

        watch: Any = untyped_watch
        list_fn: Callable[..., Any]
        args: tuple[str, ...]
        if kind == "tenants":
            list_fn, args = (
                self._custom.list_namespaced_custom_object,
                (GROUP, VERSION, self.namespace, PLURAL),
            )
        elif kind == "configmaps":
            list_fn, args = self._core.list_namespaced_config_map, (self.namespace,)
        else:
            list_fn, args = self._core.list_namespaced_secret, (self.namespace,)
        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(list_fn, *args, timeout_seconds=_WATCH_TIMEOUT_S):
                    if self._stop.is_set():
                        return
                    if self._concerns_us(kind, event.get("object")):
                        loop.call_soon_threadsafe(dirty.set)
            except Exception as exc:  # expired resourceVersion, dropped connection: re-watch
                log.debug("Restarting %s watch: %s", kind, exc)
                self._stop.wait(1.0)
            # A watch (re)start is a fresh list: mark dirty so a missed change is picked up.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(dirty.set)

    def _concerns_us(self, kind: str, obj: Any) -> bool:
        if kind == SNAPSHOTS:
            return not isinstance(obj, dict) or _snapshot_tenant(obj) in self._ours
        if kind == "tenants":
            if not isinstance(obj, dict):
                return True
            name = (obj.get("metadata") or {}).get("name")
            return (obj.get("status") or {}).get("shard") == self.shard_name or name in self._ours
        name = getattr(getattr(obj, "metadata", None), "name", None)
        cms, secrets = self._refs
        return name in (cms if kind == "configmaps" else secrets)


def _snapshot_tenant(snapshot: Mapping[str, Any]) -> str:
    return str((snapshot.get("spec") or {}).get("tenant", ""))
