"""The finalizer MutatingAdmissionPolicy against the real control plane: it adds the operator's
finalizer at CREATE in its own namespace only, keeps other finalizers, spares the operator its
finalizer PATCH, and the operator still adds it where the policy was not there (the fallback)
and still removes it on deletion.

The policy is installed the way the dev stack does (LocalStack.install_finalizer_policy, from
the builders the chart is tested against in test_helm.py).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.api.group import FINALIZER
from tensorwasm.dev.stack import LocalStack
from tensorwasm.operator.desired.admission import finalizer_policy_name

from .conftest import TenantOps, kube_json, tenant_manifest, wait_for

OTHER = "example.com/keep"


def create(kube: Any, namespace: str, manifest: dict[str, Any], *flags: str) -> dict[str, Any]:
    """kubectl create; returns the object as the API server answered the create."""
    out = kube.kubectl(
        "create", "-n", namespace, "-f", "-", "-o", "json", *flags, input_text=json.dumps(manifest)
    )
    created: dict[str, Any] = json.loads(out)
    return created


def finalizers(obj: dict[str, Any]) -> list[str]:
    return list(obj["metadata"].get("finalizers") or [])


def metadata_managers(kube: Any, namespace: str, name: str) -> set[str]:
    """Field managers that wrote the Tenant's metadata.finalizers (status writes excluded)."""
    tenant = kube_json(kube, "get", "tenant", name, "-n", namespace, "--show-managed-fields")
    return {
        m["manager"]
        for m in tenant["metadata"]["managedFields"]
        if not m.get("subresource") and "f:finalizers" in m.get("fieldsV1", {}).get("f:metadata", {})
    }


def stopped_writes(log: str) -> dict[str, int]:
    """The write totals the operator logs on a graceful stop ("Stopped writes={...}")."""
    line = [ln for ln in log.splitlines() if "Stopped writes=" in ln][-1]
    writes: dict[str, int] = ast.literal_eval(line.split("Stopped writes=", 1)[1].strip())
    return writes


@pytest.fixture
def install_policy(kube: Any, namespace: str, tmp_path: Path) -> Iterator[Callable[[], None]]:
    """install_policy() applies the policy and binding for `namespace` and waits until they act.
    Teardown removes both cluster-scoped objects and frees Tenants no operator released."""
    stack = LocalStack(kube.kubeconfig, namespace, tmp_path / "stack")

    def install() -> None:
        assert stack.install_finalizer_policy(timeout_s=30), "MutatingAdmissionPolicy is not served"

    yield install
    stack.remove_finalizer_policy()
    for tenant in kube_json(kube, "get", "tenants", "-n", namespace)["items"]:
        kube.kubectl("patch", "tenant", tenant["metadata"]["name"], "-n", namespace, "--type=merge",
                     "-p", '{"metadata":{"finalizers":null}}', check=False)  # fmt: skip
    name = finalizer_policy_name(namespace)
    for kind in ("mutatingadmissionpolicy", "mutatingadmissionpolicybinding"):
        assert not kube.kubectl("get", kind, name, "--ignore-not-found", "-o", "name").strip()


@pytest.fixture
def other_namespace(kube: Any, namespace: str) -> Iterator[str]:
    name = f"{namespace[:50]}-other"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


def test_created_tenant_carries_the_finalizer_in_the_create_response(
    kube: Any, namespace: str, install_policy: Callable[[], None]
) -> None:
    assert finalizers(create(kube, namespace, tenant_manifest("before"))) == []
    install_policy()
    assert finalizers(create(kube, namespace, tenant_manifest("created"))) == [FINALIZER]
    # kubectl apply --server-side creates through the same admission chain.
    out = kube.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", "-o", "json",
                       input_text=json.dumps(tenant_manifest("applied")))  # fmt: skip
    assert finalizers(json.loads(out)) == [FINALIZER]
    # CREATE only: a Tenant that existed before the policy is left to the operator.
    assert finalizers(kube_json(kube, "get", "tenant", "before", "-n", namespace)) == []
    kube.kubectl("label", "tenant", "before", "-n", namespace, "touched=yes")
    assert finalizers(kube_json(kube, "get", "tenant", "before", "-n", namespace)) == []


def test_tenant_in_another_namespace_gets_no_finalizer(
    kube: Any, namespace: str, other_namespace: str, install_policy: Callable[[], None]
) -> None:
    install_policy()
    assert finalizers(create(kube, other_namespace, tenant_manifest("elsewhere"), "--dry-run=server")) == []
    assert finalizers(create(kube, namespace, tenant_manifest("here"), "--dry-run=server")) == [FINALIZER]


def test_existing_finalizers_are_kept_and_ours_added_once(
    kube: Any, namespace: str, install_policy: Callable[[], None]
) -> None:
    install_policy()
    mixed = tenant_manifest("mixed")
    mixed["metadata"]["finalizers"] = [OTHER]
    assert finalizers(create(kube, namespace, mixed)) == [OTHER, FINALIZER]
    ours = tenant_manifest("ours")
    ours["metadata"]["finalizers"] = [FINALIZER]
    assert finalizers(create(kube, namespace, ours)) == [FINALIZER]


def test_operator_writes_no_finalizer_patch_and_still_releases_on_delete(
    kube: Any, namespace: str, install_policy: Callable[[], None], operator_runner: Any, tenants: TenantOps
) -> None:
    op = operator_runner(shards="2")
    wait_for(lambda: "Started namespace=" in op.current_log(), 30, "operator start")
    # Without the policy the operator adds the finalizer itself: one metadata PATCH (the fallback).
    tenants.apply(tenant_manifest("old"))
    tenants.wait_phase(["old"], "Placed")
    install_policy()
    tenants.apply(tenant_manifest("new"))
    tenants.wait_phase(["new"], "Placed")
    op.stop()
    log = op.current_log()
    assert f"Reconciled Tenant {namespace}/new phase=Placed writes=" in log, log
    writes = stopped_writes(log)
    assert writes.get("patch tenants") == 1, writes  # "old" only; "new" came with it
    assert writes.get("patch tenants/status", 0) >= 2, writes
    by_name = {t["metadata"]["name"]: t for t in tenants.all()}
    assert finalizers(by_name["old"]) == finalizers(by_name["new"]) == [FINALIZER]
    # The API server's record agrees: the operator updated old's metadata, never new's.
    assert metadata_managers(kube, namespace, "old") == {"tensorwasm-operator"}
    assert metadata_managers(kube, namespace, "new") == set()

    op.start()
    wait_for(lambda: "Started namespace=" in op.current_log(), 30, "operator restart")
    kube.kubectl("delete", "tenant", "old", "new", "-n", namespace, "--wait=false")
    wait_for(lambda: not tenants.all(), 30, "both Tenants deleted")
    op.stop()
    assert stopped_writes(op.current_log()).get("patch tenants") == 2  # each finalizer removed
