"""The Helm chart on the dev cluster's real node, installed the way a user installs it.

Owns the steps between `tensorwasm dev cluster up` and a serving release: build the image
(`hack/image/build.py`, the Containerfile without a daemon) and import it into the node; a namespace
that enforces Pod Security "restricted"; a local PersistentVolume for the shards' snapshot claim
(static provisioning: the dev cluster has no storage provisioner, as many bare-metal clusters have
none); `helm install --wait` with examples/values-dev-cluster.yaml; and reaching a tenant through
its Service's ClusterIP (routed from the host) with the token from its Secret.
Used by `make demo` and tests/node. Must not import the runtime or the operator.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorwasm.api.group import SNAPSHOT, TENANT
from tensorwasm.api.names import tenant_service_name, token_secret_name
from tensorwasm.dev.cluster import REPO_ROOT, ClusterError, ClusterState, LocalControlPlane

CHART = REPO_ROOT / "helm" / "tensorwasm"
DEV_VALUES = REPO_ROOT / "examples" / "values-dev-cluster.yaml"
IMAGE_BUILD = REPO_ROOT / "hack" / "image" / "build.py"
STORAGE_CLASS = "tensorwasm-local"  # examples/values-dev-cluster.yaml names it
REAL_NODE = "tensorwasm-real"
IMAGE_UID = 65532  # the Containerfile's user: it owns the snapshot volume


@dataclass(frozen=True)
class Image:
    ref: str
    digest: str
    archive: Path


def build_image(log: Callable[[str], None] = print) -> Image:
    """`make image`: cached, so a second call takes under a second."""
    proc = subprocess.run(
        [sys.executable, str(IMAGE_BUILD)], capture_output=True, text=True, check=False, cwd=REPO_ROOT
    )
    if proc.returncode != 0:
        raise ClusterError(f"building the image failed:\n{proc.stderr.strip()[-2000:]}")
    fields = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    image = Image(fields["image"].strip(), fields["digest"].strip(), Path(fields["archive"].strip()))
    log(f"Built image {image.ref} {image.digest} ({image.archive})")
    return image


def build_namespace(name: str) -> dict[str, Any]:
    """A namespace whose pods must meet Pod Security "restricted" (the chart's pods all do)."""
    labels = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def build_local_storage_class() -> dict[str, Any]:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS},
        "provisioner": "kubernetes.io/no-provisioner",
        # Bind when a pod needs it, so the scheduler and the volume's node agree.
        "volumeBindingMode": "WaitForFirstConsumer",
    }


def local_volume_name(namespace: str, claim: str) -> str:
    return f"{namespace}-{claim}"[:253]


def build_local_volume(namespace: str, claim: str, path: Path, size: str = "1Gi") -> dict[str, Any]:
    """A `local` PersistentVolume on the real node, reserved for one claim (claimRef)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": local_volume_name(namespace, claim), "labels": {"tensorwasm.io/dev": "true"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "claimRef": {"namespace": namespace, "name": claim},
            "local": {"path": str(path)},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [
                            {"key": "kubernetes.io/hostname", "operator": "In", "values": [REAL_NODE]}
                        ]}
                    ]
                }
            },
        },
    }  # fmt: skip


@dataclass(frozen=True)
class TenantAccess:
    """Where and how to call one tenant from the host."""

    url: str  # http://<ClusterIP>:<port>
    token: str

    def invoke(
        self, function: str, body: bytes, timeout_s: float = 10.0, connect_within_s: float = 60.0
    ) -> tuple[int, bytes]:
        """One POST; (status, body). Connection failures are retried for `connect_within_s`: a new
        Service's ClusterIP answers only once kube-proxy has programmed it, which on a busy node can
        lag the Tenant turning Ready by seconds."""
        deadline = time.monotonic() + connect_within_s
        request = urllib.request.Request(
            f"{self.url}/v1/functions/{function}/invoke",
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        while True:
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


class DevRelease:
    """One release of the chart in one namespace of a dev cluster with a real node."""

    def __init__(
        self,
        plane: LocalControlPlane,
        state: ClusterState,
        namespace: str,
        release: str = "tensorwasm",
        log: Callable[[str], None] = print,
    ) -> None:
        if state.node_slot is None:
            raise ClusterError(
                "the chart's pods need the real node: start the cluster without --no-real-node"
            )
        self.plane, self.state, self.namespace, self.release, self.log = plane, state, namespace, release, log
        self.bin_dir = Path(state.bin_dir)

    @property
    def snapshot_claim(self) -> str:
        return (
            f"{self.release}-snapshots"  # the chart's "<fullname>-snapshots" (release holds the chart name)
        )

    @property
    def volume_dir(self) -> Path:
        return self.state.node_paths.root / "volumes" / local_volume_name(self.namespace, self.snapshot_claim)

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        return self.plane.kubectl(self.state, *args, input_text=input_text, check=check)

    def apply(self, *objects: dict[str, Any]) -> None:
        items = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
        self.kubectl("apply", "--server-side", "-f", "-", input_text=json.dumps(items))

    def get(self, kind: str, name: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.kubectl("get", kind, name, "-n", self.namespace, "-o", "json"))
        return out

    def helm(self, *args: str, timeout_s: float = 600) -> str:
        env = {**os.environ, "KUBECONFIG": self.state.kubeconfig}
        proc = subprocess.run(
            [str(self.bin_dir / "helm"), *args, "-n", self.namespace],
            capture_output=True, text=True, check=False, env=env, timeout=timeout_s,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ClusterError(f"helm {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def prepare(self, image: Image) -> None:
        """Image on the node, the restricted namespace, and the snapshot volume."""
        self.plane.import_image(self.state, image.archive)
        self.prepare_storage()

    def prepare_storage(self) -> None:
        """The restricted namespace and the local volume the snapshot claim binds to."""
        self.apply(build_namespace(self.namespace), build_local_storage_class())
        self.volume_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.volume_dir, IMAGE_UID, IMAGE_UID)
        self.apply(build_local_volume(self.namespace, self.snapshot_claim, self.volume_dir))

    def install(self, *sets: str, values: Sequence[Path] = (DEV_VALUES,), timeout_s: int = 300) -> None:
        args = ["upgrade", "--install", self.release, str(CHART), "--wait", f"--timeout={timeout_s}s"]
        for path in values:
            args += ["-f", str(path)]
        for value in sets:
            args += ["--set", value]
        self.helm(*args, timeout_s=timeout_s + 60)

    def wait_tenant_ready(self, name: str, timeout_s: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            tenant = self.get(TENANT.singular, name)
            if (tenant.get("status") or {}).get("phase") == "Ready":
                return tenant
            if time.monotonic() > deadline:
                raise ClusterError(f"Tenant {name} not Ready after {timeout_s:.0f}s: {tenant.get('status')}")
            time.sleep(0.5)

    def access(self, tenant: str) -> TenantAccess:
        obj = self.get(TENANT.singular, tenant)
        service = self.get("service", tenant_service_name(tenant))
        secret_name = token_secret_name(tenant, ((obj["spec"].get("authSecretRef") or {}).get("name")))
        token = base64.b64decode(self.get("secret", secret_name)["data"]["token"]).decode()
        port = service["spec"]["ports"][0]["port"]
        return TenantAccess(f"http://{service['spec']['clusterIP']}:{port}", token)

    def uninstall(self) -> None:
        """Tenants first (the operator releases their finalizers), then the release and the volume."""
        exists = self.kubectl("get", "namespace", self.namespace, "--ignore-not-found", "-o", "name")
        if not exists.strip():
            return
        kinds = f"{SNAPSHOT.crd_name},{TENANT.crd_name}"
        self.kubectl("delete", kinds, "--all", "-n", self.namespace, "--timeout=120s", check=False)
        self.helm("uninstall", self.release, "--wait", "--ignore-not-found")
        self.kubectl("delete", "namespace", self.namespace, "--timeout=120s", check=False)
        self.kubectl(
            "delete", "pv", local_volume_name(self.namespace, self.snapshot_claim), "--ignore-not-found"
        )
        shutil.rmtree(self.volume_dir, ignore_errors=True)
