"""The runtime shard StatefulSet and its headless Service, from the operator's settings.

Pure; must not import kopf or kube/. The StatefulSet ordinal is the shard id; each pod runs
`tensorwasm runtime --shard-name <pod name>` and serves the Tenants whose status.shard names it.
"""

from __future__ import annotations

from typing import Any

from tensorwasm.operator.desired.meta import shard_labels
from tensorwasm.operator.settings import OperatorSettings


def build_shard_service(settings: OperatorSettings) -> dict[str, Any]:
    """Headless Service: stable DNS per shard pod (<pod>.<service>) for the StatefulSet."""
    labels = shard_labels(settings.shard_name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": settings.shard_name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": labels,
            "ports": [
                {"name": "http", "port": settings.runtime_port, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def build_shard_statefulset(settings: OperatorSettings, replicas: int) -> dict[str, Any]:
    """The shard StatefulSet; `replicas` is the live count when it exists (an HPA may own it)."""
    labels = shard_labels(settings.shard_name)
    resources: dict[str, Any] = {"requests": {"cpu": "500m", "memory": "1Gi"}}
    if settings.shard_gpus:
        resources["limits"] = {"nvidia.com/gpu": str(settings.shard_gpus)}
    pod_spec: dict[str, Any] = {
        "containers": [
            {
                "name": "runtime",
                "image": settings.image,
                "imagePullPolicy": settings.image_pull_policy,
                "args": [
                    "runtime",
                    "--namespace=$(POD_NAMESPACE)",
                    "--shard-name=$(POD_NAME)",
                    f"--port={settings.runtime_port}",
                ],
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                ],
                "ports": [{"name": "http", "containerPort": settings.runtime_port, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
                "resources": resources,
            }
        ],
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
        "metadata": {"name": settings.shard_name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "replicas": replicas,
            "serviceName": settings.shard_name,
            # Shards are independent: start and stop them all at once, not one by one.
            "podManagementPolicy": "Parallel",
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
    container["volumeMounts"] = [{"name": MPS_VOLUME, "mountPath": pipe_dir}]
    pod_spec["hostIPC"] = True
    pod_spec["volumes"] = [{"name": MPS_VOLUME, "hostPath": {"path": pipe_dir, "type": "Directory"}}]
