"""The operator's only door to the Kubernetes API (reads, server-side apply, status patches, events).

Everything else in the operator builds dicts and decides; this package sends them.
Must not import handlers/ or reconciler logic.
"""

from tensorwasm.operator.kube.client import KubeApi, KubeError, connect, resource_path

__all__ = ["KubeApi", "KubeError", "connect", "resource_path"]
