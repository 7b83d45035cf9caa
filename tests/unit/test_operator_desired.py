"""Pure builders and status maths, compared by equality (no cluster)."""

from __future__ import annotations

from typing import Any

from tensorwasm.api.conditions import (
    Placement,
    desired_status,
    merge_conditions,
    status_patch,
    tenant_phase,
)
from tensorwasm.api.names import shard_ordinal
from tensorwasm.api.tenant import parse_tenant
from tensorwasm.operator.desired.shards import build_shard_service, build_shard_statefulset
from tensorwasm.operator.desired.tenant import build_tenant_service, build_token_secret
from tensorwasm.operator.reconciler import is_subset
from tensorwasm.operator.settings import OperatorSettings, load_settings

SETTINGS = OperatorSettings(namespace="tw", shard_name="shard")
OWNER = {
    "apiVersion": "tensorwasm.io/v1alpha1",
    "kind": "Tenant",
    "name": "alpha",
    "uid": "u1",
    "controller": True,
    "blockOwnerDeletion": True,
}
LABELS = {
    "app.kubernetes.io/name": "tensorwasm-tenant",
    "tensorwasm.io/tenant": "alpha",
    "app.kubernetes.io/managed-by": "tensorwasm-operator",
}


def tenant(status: dict[str, Any] | None = None, generation: int = 1, **spec: Any) -> Any:
    s: dict[str, Any] = {"module": {"url": "https://x/m.wasm", "sha256": "b" * 64}, "functions": ["echo"]}
    s.update(spec)
    meta = {"name": "alpha", "namespace": "tw", "uid": "u1", "generation": generation}
    return parse_tenant({"metadata": meta, "spec": s, "status": status or {}})


def test_tenant_service_selects_the_owning_shard_pod() -> None:
    assert build_tenant_service(tenant(), "shard-1", SETTINGS) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "tw-alpha", "namespace": "tw", "labels": LABELS, "ownerReferences": [OWNER]},
        "spec": {
            "type": "ClusterIP",
            "selector": {"statefulset.kubernetes.io/pod-name": "shard-1"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }


def test_token_secret_uses_the_named_secret_or_a_default() -> None:
    default = build_token_secret(tenant(), "t0k")
    assert default["metadata"]["name"] == "tw-alpha-token"
    assert default["stringData"] == {"token": "t0k"}
    assert default["metadata"]["ownerReferences"] == [OWNER]
    named = build_token_secret(tenant(authSecretRef={"name": "mine"}), "t0k", "r3ad")
    assert named["metadata"]["name"] == "mine"
    assert named["stringData"] == {"token": "t0k", "read-token": "r3ad"}  # a read-only token beside it


def test_shard_statefulset_and_headless_service() -> None:
    sts = build_shard_statefulset(SETTINGS, 3)
    labels = {
        "app.kubernetes.io/name": "shard",
        "app.kubernetes.io/component": "runtime-shard",
        "app.kubernetes.io/managed-by": "tensorwasm-operator",
    }
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == "shard"
    assert sts["spec"]["selector"] == {"matchLabels": labels}
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "runtime"
    assert {"name": "snapshots", "emptyDir": {}} in sts["spec"]["template"]["spec"]["volumes"]
    assert "nodeSelector" not in sts["spec"]["template"]["spec"]
    svc = build_shard_service(SETTINGS)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == labels
    gpu = build_shard_statefulset(OperatorSettings(shard_gpus=1, shard_node_selector={"gpu": "yes"}), 1)
    pod = gpu["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"gpu": "yes"}


def test_shard_statefulset_joins_mps_with_the_shard_slice() -> None:
    plain = build_shard_statefulset(SETTINGS, 1)["spec"]["template"]["spec"]
    assert "hostIPC" not in plain and all("hostPath" not in v for v in plain["volumes"])
    settings = load_settings({
        "TENSORWASM_OPERATOR_SHARD_MPS_PIPE_DIR": "/var/run/mps",
        "TENSORWASM_OPERATOR_SHARD_SM_PERCENT": "25",
        "TENSORWASM_OPERATOR_SHARD_GPU_MEMORY": "20Gi",
    })  # fmt: skip
    pod = build_shard_statefulset(settings, 1)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["hostIPC"] is True
    assert pod["volumes"][-1] == {
        "name": "mps-pipe",
        "hostPath": {"path": "/var/run/mps", "type": "Directory"},
    }
    assert container["volumeMounts"][-1] == {"name": "mps-pipe", "mountPath": "/var/run/mps"}
    assert container["env"][2:] == [
        {"name": "TENSORWASM_RUNTIME_MPS_PIPE_DIR", "value": "/var/run/mps"},
        {"name": "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "value": "25"},
        {"name": "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "value": "0=20480M"},
    ]


def test_shard_ordinal() -> None:
    assert shard_ordinal("shard", "shard-12") == 12
    assert shard_ordinal("shard", "other-1") is None
    assert shard_ordinal("shard", "shard-x") is None
    assert shard_ordinal("shard", None) is None


def test_phases() -> None:
    placed = Placement("shard-0")
    assert tenant_phase(tenant(), Placement(None, "InsufficientCapacity", "full"))[0] == "Pending"
    assert tenant_phase(tenant(), placed)[0] == "Placed"
    assert tenant_phase(tenant(functions=[]), placed)[0] == "Failed"
    report = {"shard": "shard-0", "observedGeneration": 1, "loaded": True, "gpuBytesInUse": 5}
    assert tenant_phase(tenant({"runtime": report}), placed)[0] == "Ready"
    stale = {**report, "observedGeneration": 1}
    assert tenant_phase(tenant({"runtime": stale}, generation=2), placed)[0] == "Placed"
    other = {**report, "shard": "shard-1"}
    assert tenant_phase(tenant({"runtime": other}), placed)[0] == "Placed"
    bad = {**report, "loaded": False, "reason": "ModuleRejected", "message": "bad magic"}
    phase, conds = tenant_phase(tenant({"runtime": bad}), placed)
    assert phase == "Degraded"
    assert conds[1].reason == "ModuleRejected" and conds[1].message == "bad magic"


def test_transition_time_only_moves_on_status_change() -> None:
    _, conds = tenant_phase(tenant(), Placement("shard-0"))
    first = merge_conditions([], conds, 1, "T1")
    assert {c["lastTransitionTime"] for c in first} == {"T1"}
    again = merge_conditions(first, conds, 1, "T2")
    assert again == first


def test_unchanged_status_gives_an_empty_patch() -> None:
    report = {"shard": "shard-0", "observedGeneration": 1, "loaded": True, "gpuBytesInUse": 5}
    t = tenant({"runtime": report})
    want = desired_status(t, Placement("shard-0"), "http://tw-alpha.tw.svc:80", "tw-alpha-token", "T1")
    assert want["gpuBytesInUse"] == 5 and want["phase"] == "Ready"
    live = {**want, "runtime": report}
    assert (
        status_patch(
            live, desired_status(tenant(live), Placement("shard-0"), want["endpoint"], "tw-alpha-token", "T9")
        )
        == {}
    )
    moved = desired_status(tenant(live), Placement("shard-1"), want["endpoint"], "tw-alpha-token", "T9")
    assert set(status_patch(live, moved)) == {"shard", "phase", "conditions", "gpuBytesInUse", "gpuInUse"}


def test_is_subset_ignores_server_defaults() -> None:
    desired = {"spec": {"ports": [{"port": 80}], "selector": {"a": "b"}}}
    assert is_subset(desired, {"spec": {"ports": [{"port": 80, "protocol": "TCP"}], "selector": {"a": "b"}}})
    assert not is_subset(desired, {"spec": {"ports": [{"port": 81}], "selector": {"a": "b"}}})
    assert not is_subset(desired, {"spec": {"ports": [{"port": 80}, {"port": 81}], "selector": {"a": "b"}}})
    assert not is_subset(desired, None)
