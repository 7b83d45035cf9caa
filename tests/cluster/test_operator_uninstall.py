"""Uninstalling in the wrong order and the recovery: Tenants left Terminating with no operator to free them.

The real operator process places Tenants (its finalizer on each; a Snapshot carries the shards' blob
finalizer), then dies. Deleting them leaves them Terminating, and their namespace with them; the
documented recovery, `tensorwasm operator --release-finalizers`, frees them and the namespace goes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tensorwasm.api.group import FINALIZER, SNAPSHOT_BLOB_FINALIZER

from .conftest import REPO, TenantOps, kube_json, tenant_manifest, wait_for


def release(kube: Any, namespace: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensorwasm.cli.main", "operator", "--release-finalizers",
         "--namespace", namespace],
        env=kube.env, capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip


def test_release_finalizers_frees_what_an_uninstalled_operator_left_terminating(
    kube: Any, namespace: str, operator_runner: Any, tenants: TenantOps
) -> None:
    op = operator_runner()
    tenants.apply(tenant_manifest("a"), tenant_manifest("b"))
    tenants.wait_phase(["a", "b"], "Placed")
    snapshot = {
        "apiVersion": "tensorwasm.io/v1alpha1", "kind": "Snapshot",
        "metadata": {"name": "a-1", "finalizers": [SNAPSHOT_BLOB_FINALIZER]}, "spec": {"tenant": "a"},
    }  # fmt: skip
    kube.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(snapshot))
    op.kill()  # helm uninstall first: no operator left
    # A live Tenant keeps its finalizer: only the stuck ones are released.
    kube.kubectl("delete", "tenant", "a", "-n", namespace, "--wait=false")
    kube.kubectl("delete", "snapshot", "a-1", "-n", namespace, "--wait=false")
    stuck = kube_json(kube, "get", "tenant", "a", "-n", namespace)
    assert stuck["metadata"]["deletionTimestamp"] and FINALIZER in stuck["metadata"]["finalizers"]

    done = release(kube, namespace)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"released tenant/a in {namespace}",
        f"released snapshot/a-1 in {namespace}",
        f"2 object(s) released in namespace {namespace}",
    ]

    def names(kind: str) -> list[str]:
        return [i["metadata"]["name"] for i in kube_json(kube, "get", kind, "-n", namespace)["items"]]

    wait_for(lambda: names("tenants") == ["b"] and names("snapshots") == [], 60, "a and a-1 gone")
    assert FINALIZER in kube_json(kube, "get", "tenant", "b", "-n", namespace)["metadata"]["finalizers"]

    # Then the namespace, with b still in it: it would hang Terminating on b's finalizer; once
    # released, nothing of it is left.
    kube.kubectl("delete", "namespace", namespace, "--wait=false")
    b_meta = lambda: kube_json(kube, "get", "tenant", "b", "-n", namespace)["metadata"]  # noqa: E731
    wait_for(lambda: b_meta().get("deletionTimestamp"), 60, "the namespace deletes b")
    assert release(kube, namespace).returncode == 0
    wait_for(
        lambda: not kube.kubectl("get", "namespace", namespace, "--ignore-not-found", "-o", "name").strip(),
        120,
        "the namespace gone",
    )
