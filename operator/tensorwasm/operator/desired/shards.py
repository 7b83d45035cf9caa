"""The runtime shard StatefulSet and its headless Service, from the operator's settings.

Pure; must not import kopf or kube/. The StatefulSet ordinal is the shard id; each pod runs
`tensorwasm runtime --shard-name <pod name>` and serves the Tenants whose status.shard names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tensorwasm.operator.desired.meta import shard_labels
from tensorwasm.operator.settings import OperatorSettings


def build_owner_reference(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """The operator's Deployment as the owner of the shard set: deleting the release (helm uninstall)
    lets the garbage collector remove the StatefulSet, its pods and the headless Service."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
        "uid": deployment["metadata"]["uid"],
    }


def _metadata(settings: OperatorSettings, owner: Mapping[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": settings.shard_name,
        "namespace": settings.namespace,
        "labels": shard_labels(settings.shard_name),
    }
    if owner is not None:
        meta["ownerReferences"] = [dict(owner)]
    return meta


def build_shard_service(settings: OperatorSettings, owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Headless Service: stable DNS per shard pod (<pod>.<service>) for the StatefulSet."""
    labels = shard_labels(settings.shard_name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(settings, owner),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": labels,
            "ports": [
                {"name": "http", "port": settings.runtime_port, "targetPort": "http", "protocol": "TCP"},
                # Prometheus scrapes /metrics here (the chart's ServiceMonitor); tenants never see it.
                {"name": "admin", "port": settings.admin_port, "targetPort": "admin", "protocol": "TCP"},
            ],
        },
    }


SNAPSHOT_DIR = "/var/lib/tensorwasm/snapshots"
CACHE_DIR = "/var/cache/tensorwasm"
SIGNING_KEYS_DIR = "/var/run/tensorwasm/snapshot-keys"  # the signing Secret, read-only
AUDIT_DIR = "/var/log/tensorwasm"  # shard.audit.log=file: one rotated file set per pod
# The runtime keeps the current file and 5 rotated ones of 100 MiB (runtime/audit.py): 600 MiB at most.
AUDIT_EMPTYDIR_LIMIT = "700Mi"
# Pod Security Admission "restricted": non-root, no privilege escalation, no capabilities, RuntimeDefault
# seccomp. The image's user is 65532; a read-only root keeps a compromised guest from changing the runtime.
RESTRICTED_POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "fsGroup": 65532,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


# The grace period counts from SIGTERM, and so does the hand-off's bound (--handoff-max; its
# clock starts as the hand-off does, before its replicas GET, which HANDOFF_START_S bounds). After
# it a shard pod answers "moving" 5 s more (HANDOFF_LINGER_S), then its shutdown ends within 25 s
# (SHUTDOWN_HARD_S, runtime/__main__.py): 660 + 5 + 25 = 690 s with nothing to spare. The 5 s
# SHARD_STOP_SLACK_S cover what no constant bounds: the hand-off's 0.1 s looks overshooting its
# deadline, the event-loop turns between SIGTERM and the hand-off, a loaded node. A test compares.
SHARD_STOP_SLACK_S = 5
SHARD_STOP_MARGIN_S = 5 + 25 + SHARD_STOP_SLACK_S  # 35


def shard_grace_period_s(settings: OperatorSettings) -> int:
    """The shard pods' terminationGracePeriodSeconds: the longest hand-off plus the stop after it,
    from the same setting as the shards' --handoff-max, so the two cannot disagree. Only an upper
    bound: a shard whose moves are over stops then."""
    return settings.shard_handoff_max_s + SHARD_STOP_MARGIN_S


def build_shard_args(settings: OperatorSettings) -> list[str]:
    """`tensorwasm runtime` flags of a shard pod (a unit test parses them with the runtime's parser)."""
    return [
        "runtime",
        f"--listen=0.0.0.0:{settings.runtime_port}",
        f"--admin-listen=0.0.0.0:{settings.admin_port}",
        "--namespace=$(POD_NAMESPACE)",
        "--shard-name=$(POD_NAME)",
        f"--snapshot-dir={SNAPSHOT_DIR}",
        f"--cache-dir={CACHE_DIR}",
        f"--snapshot-hot-tier-bytes={settings.shard_hot_tier_bytes}",
        f"--idle-after={settings.shard_idle_after}",
        f"--prewarm-tenants={settings.shard_prewarm_tenants}",
        f"--handoff-max={settings.shard_handoff_max_s}",
        # Placement counts sleepers at the active fraction; the shard then keeps the caps of its awake
        # tenants within the slice (less the 1.5x fragmentation headroom) by putting idle ones to sleep.
        *_resident_args(settings),
        f"--snapshot-signing={settings.shard_snapshot_signing}",
        *([f"--snapshot-signing-keys={SIGNING_KEYS_DIR}"] if settings.shard_snapshot_signing_secret else []),
        f"--audit-log={_audit_target(settings)}",
    ]


def _audit_target(settings: OperatorSettings) -> str:
    # Named by pod: on a claim every shard shares, each writes (and rotates) files of its own.
    return (
        f"{AUDIT_DIR}/$(POD_NAME).audit.log"
        if settings.shard_audit_log == "file"
        else settings.shard_audit_log
    )


def _resident_args(settings: OperatorSettings) -> list[str]:
    cap = settings.shard_capacity
    return [f"--resident-gpu-memory={cap.gpu_memory_bytes * 2 // 3}"] if cap.active_fraction < 1 else []


def build_shard_volumes(settings: OperatorSettings) -> list[dict[str, Any]]:
    """Snapshots on the shared claim (any shard restores any blob: moves need it), else an emptyDir."""
    snapshots: dict[str, Any] = (
        {"persistentVolumeClaim": {"claimName": settings.shard_snapshot_claim}}
        if settings.shard_snapshot_claim
        else {"emptyDir": {}}
    )
    volumes = [
        {"name": "snapshots", **snapshots},
        {"name": "module-cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if settings.shard_snapshot_signing_secret:
        # A Secret volume, not env: kubelet updates it in place, so keys rotate without a restart.
        # 0440 + the pod's fsGroup: readable by the runtime's group only.
        secret = {"secretName": settings.shard_snapshot_signing_secret, "defaultMode": 0o440}
        volumes.append({"name": "snapshot-keys", "secret": secret})
    if settings.shard_audit_log == "file":
        audit: dict[str, Any] = (
            {"persistentVolumeClaim": {"claimName": settings.shard_audit_claim}}
            if settings.shard_audit_claim
            else {"emptyDir": {"sizeLimit": AUDIT_EMPTYDIR_LIMIT}}
        )
        volumes.append({"name": "audit", **audit})
    return volumes


def build_shard_statefulset(
    settings: OperatorSettings, replicas: int, owner: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The shard StatefulSet; `replicas` is the live count when it exists (an HPA may own it)."""
    labels = shard_labels(settings.shard_name)
    resources: dict[str, Any] = {k: dict(v) for k, v in settings.shard_resources.items()}
    if settings.shard_gpus:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = str(settings.shard_gpus)
    container: dict[str, Any] = {
        "name": "runtime",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": build_shard_args(settings),
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ],
        "ports": [
            {"name": "http", "containerPort": settings.runtime_port, "protocol": "TCP"},
            {"name": "admin", "containerPort": settings.admin_port, "protocol": "TCP"},
        ],
        # Startup covers the first list of Tenants and module compiles; liveness only asks "is the
        # loop alive", readiness "are my tenants loaded".
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 1,
            "failureThreshold": 120,
        },
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 2},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": resources,
        "securityContext": dict(RESTRICTED_CONTAINER_SECURITY),
        "volumeMounts": [
            {"name": "snapshots", "mountPath": SNAPSHOT_DIR},
            {"name": "module-cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            *(
                [{"name": "snapshot-keys", "mountPath": SIGNING_KEYS_DIR, "readOnly": True}]
                if settings.shard_snapshot_signing_secret
                else []
            ),
            *([{"name": "audit", "mountPath": AUDIT_DIR}] if settings.shard_audit_log == "file" else []),
        ],
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "securityContext": dict(RESTRICTED_POD_SECURITY),
        "volumes": build_shard_volumes(settings),
        # SIGTERM: a scaled-in shard hands its tenants off (at most --handoff-max), then stops.
        "terminationGracePeriodSeconds": shard_grace_period_s(settings),
    }
    if settings.shard_mps_pipe_dir:
        add_mps_client(pod_spec, settings)
    if settings.shard_service_account:  # created with its RBAC by the Helm chart
        pod_spec["serviceAccountName"] = settings.shard_service_account
    if settings.shard_node_selector:
        pod_spec["nodeSelector"] = dict(settings.shard_node_selector)
    if settings.shard_tolerations:
        pod_spec["tolerations"] = [dict(t) for t in settings.shard_tolerations]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(settings, owner),
        "spec": {
            "replicas": replicas,
            "serviceName": settings.shard_name,
            # Shards are independent: start and stop them all at once, not one by one.
            "podManagementPolicy": "Parallel",
            # The operator replaces the pods itself (roll.py): it moves a shard's tenants to a
            # surge shard before it deletes the pod, so no tenant is ever without a shard.
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


MPS_VOLUME = "mps-pipe"


def add_mps_client(pod_spec: dict[str, Any], settings: OperatorSettings) -> None:
    """Join the node's MPS control daemon (the chart's DaemonSet) with this shard's own slice.

    MPS clients reach the server through the pipe directory and shared memory (host IPC); the
    active thread % and the pinned device memory limit bound the whole shard to its capacity.
    """
    pipe_dir = settings.shard_mps_pipe_dir
    capacity = settings.shard_capacity
    container = pod_spec["containers"][0]
    container["env"] += [
        {"name": "TENSORWASM_RUNTIME_MPS_PIPE_DIR", "value": pipe_dir},
        {"name": "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "value": str(capacity.sm_percent)},
        {"name": "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "value": f"0={capacity.gpu_memory_bytes >> 20}M"},
    ]
    container["volumeMounts"].append({"name": MPS_VOLUME, "mountPath": pipe_dir})
    # Host IPC and a hostPath are outside Pod Security "restricted" (and "baseline"): a GPU shard
    # namespace with MPS needs the "privileged" level (docs/helm.md names this exception).
    pod_spec["hostIPC"] = True
    pod_spec["volumes"].append({"name": MPS_VOLUME, "hostPath": {"path": pipe_dir, "type": "Directory"}})
