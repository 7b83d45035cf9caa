"""Operator lifecycle against the real control plane: idempotence, crash safety, clean deletion."""

from __future__ import annotations

import collections
import json
import random
import re
from typing import Any

from tests.conftest import wait_for

from .conftest import TenantOps, kube_json, tenant_manifest

SHARD = "tensorwasm-shard"


def versions(kube: Any, namespace: str) -> dict[str, str]:
    """resourceVersion of every object the operator writes (a write, even a no-op one, bumps it).

    The StatefulSet's status belongs to the statefulset controller, which rewrites it as its pods
    come and go (a new resourceVersion each time), so it stands as everything but its status.
    """
    out: dict[str, str] = {}
    for kind in ("tenants", "services", "secrets", "statefulsets"):
        for item in kube_json(kube, "get", kind, "-n", namespace)["items"]:
            key = f"{kind}/{item['metadata']['name']}"
            sts = kind == "statefulsets"
            out[key] = statefulset_without_status(item) if sts else item["metadata"]["resourceVersion"]
    return out


def statefulset_without_status(item: dict[str, Any]) -> str:
    """The StatefulSet as the operator writes it: spec and metadata, without what status writes touch."""
    meta = {k: v for k, v in item["metadata"].items() if k not in ("resourceVersion", "managedFields")}
    # An apply that changes a field stamps its manager's entry with a new time; status writes are apart.
    managers = [m for m in item["metadata"].get("managedFields") or [] if m.get("subresource") != "status"]
    return json.dumps({"metadata": meta, "managers": managers, "spec": item["spec"]}, sort_keys=True)


def reconciled(op: Any, namespace: str, name: str, phase: str = r"\S+") -> int:
    """How many reconciles of `name` (ending in `phase`) this operator run has logged."""
    return len(re.findall(rf"Reconciled Tenant {namespace}/{name} phase={phase} writes=", op.current_log()))


def test_second_reconcile_of_unchanged_tenants_writes_nothing(
    kube: Any, namespace: str, operator_runner: Any, tenants: TenantOps
) -> None:
    # DEBUG: every reconcile logs a line (writes=0 ones too), so the test waits on those, not on time.
    op = operator_runner(shards="2", log_level="DEBUG")
    names = [f"z{i}" for i in range(10)]
    tenants.apply(*(tenant_manifest(n) for n in names))
    tenants.wait_phase(names, "Placed")
    tenants.report("z0", tenants.shards()["z0"] or "")
    tenants.wait_phase(["z0"], "Ready")
    wait_for(lambda: reconciled(op, namespace, "z0", "Ready"), 30, "the operator saw z0 Ready")
    before = versions(kube, namespace)
    # A restart re-lists and reconciles every tenant again: the second reconcile of each.
    op.stop()
    op.start()
    wait_for(lambda: all(reconciled(op, namespace, n) for n in names), 60, "every tenant reconciled again")
    # An unrelated touch (a label) makes kopf deliver a fresh event; it must not cause a write either.
    seen = reconciled(op, namespace, "z1")
    kube.kubectl("label", "tenant", "z1", "-n", namespace, "touched=yes")
    wait_for(lambda: reconciled(op, namespace, "z1") > seen, 30, "the touched tenant reconciled")
    op.stop()
    after = versions(kube, namespace)
    touched = "tenants/z1"
    assert {k: v for k, v in after.items() if k != touched} == {
        k: v for k, v in before.items() if k != touched
    }
    log = op.current_log()
    writes = [int(w) for w in re.findall(r"Reconciled Tenant \S+ phase=\S+ writes=(\d+)", log)]
    assert not any(writes), log
    assert "Stopped writes={}" in log, log


def test_kill_9_mid_reconcile_converges_without_duplicates_or_orphans(
    kube: Any, namespace: str, operator_runner: Any, tenants: TenantOps
) -> None:
    names = [f"k{i:02d}" for i in range(30)]
    tenants.apply(*(tenant_manifest(n, limits={"gpuMemory": "256Mi"}) for n in names))
    # DEBUG: every reconcile logs a line, the points the kills below are placed at.
    op = operator_runner(shards="3", shard_max_tenants="12", shard_gpu_memory="6Gi", log_level="DEBUG")
    rng = random.Random(6)
    for round_ in range(20):
        # Kills land at observable points, not after a random sleep: before the first reconcile of
        # this run, after a random number of them (mid-pass: some tenants written, some not), or
        # after the whole pass. Convergence is then awaited on state below.
        target = rng.choice([0, rng.randint(1, len(names) - 1), len(names)])

        def reached(target: int = target) -> bool:
            return len(re.findall(r"Reconciled Tenant ", op.current_log())) >= target

        wait_for(reached, 120, f"{target} reconciles in operator run {round_ + 1}", interval=0.02)
        op.kill()
        if round_ == 9:  # halfway, change the world while it is down: a delete and a new tenant
            kube.kubectl("delete", "tenant", "k00", "-n", namespace, "--wait=false")
            tenants.apply(tenant_manifest("late"))
        op.start()
    live = [n for n in names if n != "k00"] + ["late"]
    by_name = tenants.wait_phase(live, "Placed", timeout=90)
    wait_for(
        lambda: (
            not kube_json(kube, "get", "tenants", "-n", namespace, "--field-selector", "metadata.name=k00")[
                "items"
            ]
        ),
        30,
        "k00 deleted",
    )
    counts = collections.Counter(by_name[n]["status"]["shard"] for n in live)
    assert sum(counts.values()) == len(live) and max(counts.values()) <= 12
    uids = {t["metadata"]["uid"] for t in tenants.all()}
    services = tenants.owned("services")
    secrets = tenants.owned("secrets")
    # Exactly one Service and one Secret per tenant, each owned by a live tenant, selecting its shard.
    assert sorted(s["metadata"]["name"] for s in services) == sorted(f"tw-{n}" for n in live)
    assert sorted(s["metadata"]["name"] for s in secrets) == sorted(f"tw-{n}-token" for n in live)
    for obj in services + secrets:
        assert [o["uid"] for o in obj["metadata"]["ownerReferences"]] == [
            by_name[obj["metadata"]["labels"]["tensorwasm.io/tenant"]]["metadata"]["uid"]
        ]
        assert obj["metadata"]["ownerReferences"][0]["uid"] in uids
    for svc in services:
        tenant = svc["metadata"]["labels"]["tensorwasm.io/tenant"]
        assert (
            svc["spec"]["selector"]["statefulset.kubernetes.io/pod-name"]
            == by_name[tenant]["status"]["shard"]
        )
    # No tenant holds the finalizer twice, and every live one holds it once.
    for t in tenants.all():
        assert t["metadata"].get("finalizers", []).count("tensorwasm.io/finalizer") == 1
    op.assert_alive()


def test_deleting_a_tenant_removes_everything_it_owned(
    kube: Any, namespace: str, operator_runner: Any, tenants: TenantOps
) -> None:
    operator_runner(shards="1")
    tenants.apply(tenant_manifest("gone"), tenant_manifest("kept"))
    tenants.wait_phase(["gone", "kept"], "Placed")
    kube.kubectl("get", "service", "tw-gone", "-n", namespace)
    kube.kubectl("delete", "tenant", "gone", "-n", namespace, "--timeout=30s")
    # The garbage collector of the real kube-controller-manager removes the owned objects.
    wait_for(
        lambda: [s for s in tenants.owned("services") if "gone" in s["metadata"]["name"]] == [],
        30,
        "the Service collected",
    )
    wait_for(
        lambda: [s for s in tenants.owned("secrets") if "gone" in s["metadata"]["name"]] == [],
        30,
        "the Secret collected",
    )
    assert {s["metadata"]["name"] for s in tenants.owned("services")} == {"tw-kept"}
    assert [t["metadata"]["name"] for t in tenants.all()] == ["kept"]
    # A user-named Secret that existed before is left alone (the tenant never owned it).
    kube.kubectl("create", "secret", "generic", "mine", "-n", namespace, "--from-literal=token=abc")
    tenants.apply(tenant_manifest("byo", authSecretRef={"name": "mine"}))
    got = tenants.wait_phase(["byo"], "Placed")["byo"]
    assert got["status"]["tokenSecretName"] == "mine"
    kube.kubectl("delete", "tenant", "byo", "-n", namespace, "--timeout=30s")
    # Once the garbage collector has removed what byo owned, it has had its chance at "mine" too.
    wait_for(lambda: not [s for s in tenants.owned("services") if s["metadata"]["name"] == "tw-byo"], 30,
             "byo's Service collected")  # fmt: skip
    kube.kubectl("get", "secret", "mine", "-n", namespace)
