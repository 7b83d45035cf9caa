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
