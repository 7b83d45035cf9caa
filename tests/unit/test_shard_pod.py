"""The shard pod the operator builds is one the runtime and a restricted namespace accept.

The operator must not import the runtime (import-linter), so this test is where the two meet:
the StatefulSet's args go through `tensorwasm runtime`'s own parser, with the env Kubernetes
substitutes, and the pod spec is checked against Pod Security "restricted".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.operator.desired.shards import (
    AUDIT_DIR,
    AUDIT_EMPTYDIR_LIMIT,
    SNAPSHOT_DIR,
    build_shard_statefulset,
)
from tensorwasm.operator.settings import OperatorSettings, SettingsError, load_settings
from tensorwasm.runtime.settings import load_settings as load_runtime_settings


def _expand(arg: str, env: dict[str, str]) -> str:
    """What the kubelet does with $(VAR) in args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)


def _pod(settings: OperatorSettings) -> dict[str, Any]:
    spec: dict[str, Any] = build_shard_statefulset(settings, 1)["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("port", [8080, 9000])
def test_shard_args_parse_with_the_runtime_parser(port: int) -> None:
    container = _pod(OperatorSettings(runtime_port=port, admin_port=port + 1, namespace="tw"))["containers"][
        0
    ]
    env = {"POD_NAME": "tensorwasm-shard-3", "POD_NAMESPACE": "tw"}
    args = [_expand(a, env) for a in container["args"]]
    assert args[0] == "runtime"
    settings = load_runtime_settings(args[1:], environ={})
    assert (settings.host, settings.port) == ("0.0.0.0", port)
    assert settings.shard_name == "tensorwasm-shard-3" and settings.namespace == "tw"
    assert settings.snapshot_dir == Path(SNAPSHOT_DIR)
    assert settings.snapshot_hot_tier_bytes == OperatorSettings().shard_hot_tier_bytes
    assert (settings.admin_host, settings.admin_port) == ("0.0.0.0", port + 1)
    assert [p["containerPort"] for p in container["ports"]] == [port, port + 1]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {str(settings.snapshot_dir), str(settings.cache_dir), "/tmp"} <= mounts


def test_shard_pod_meets_pod_security_restricted() -> None:
    pod = _pod(OperatorSettings())
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["readOnlyRootFilesystem"] is True
    assert not pod.get("hostIPC") and not pod.get("hostNetwork")
    assert all(set(v) & {"emptyDir", "persistentVolumeClaim"} for v in pod["volumes"])


def test_shard_snapshots_on_the_shared_claim() -> None:
    pod = _pod(OperatorSettings(shard_snapshot_claim="tw-snapshots"))
    volume = next(v for v in pod["volumes"] if v["name"] == "snapshots")
    assert volume == {"name": "snapshots", "persistentVolumeClaim": {"claimName": "tw-snapshots"}}


def test_shard_resources_from_settings_and_gpu_limit() -> None:
    settings = load_settings({
        "TENSORWASM_OPERATOR_SHARD_RESOURCES": '{"requests": {"cpu": "250m"}, "limits": {"memory": "2Gi"}}',
        "TENSORWASM_OPERATOR_SHARD_GPUS": "1",
    })  # fmt: skip
    resources = _pod(settings)["containers"][0]["resources"]
    assert resources == {"requests": {"cpu": "250m"}, "limits": {"memory": "2Gi", "nvidia.com/gpu": "1"}}
    with pytest.raises(SettingsError, match="SHARD_RESOURCES"):
        load_settings({"TENSORWASM_OPERATOR_SHARD_RESOURCES": '{"request": {}}'})


def test_the_operator_deployment_owns_the_shard_set() -> None:
    from tensorwasm.operator.desired.shards import build_owner_reference, build_shard_service

    deployment = {"metadata": {"name": "tensorwasm-operator", "uid": "u-1"}}
    owner = build_owner_reference(deployment)
    settings = OperatorSettings()
    for obj in (build_shard_statefulset(settings, 2, owner), build_shard_service(settings, owner)):
        assert obj["metadata"]["ownerReferences"] == [
            {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tensorwasm-operator", "uid": "u-1"}
        ]
    assert "ownerReferences" not in build_shard_statefulset(settings, 2)["metadata"]


@pytest.mark.parametrize(
    ("env", "volume"),
    [
        ({}, {"emptyDir": {"sizeLimit": AUDIT_EMPTYDIR_LIMIT}}),
        (
            {"TENSORWASM_OPERATOR_SHARD_AUDIT_CLAIM": "tw-audit"},
            {"persistentVolumeClaim": {"claimName": "tw-audit"}},
        ),
    ],
)
def test_audit_file_target_gets_a_volume_and_a_file_per_pod(
    env: dict[str, str], volume: dict[str, Any]
) -> None:
    pod = _pod(load_settings({"TENSORWASM_OPERATOR_SHARD_AUDIT_LOG": "file", **env}))
    container = pod["containers"][0]
    args = [_expand(a, {"POD_NAME": "tensorwasm-shard-3", "POD_NAMESPACE": "tw"}) for a in container["args"]]
    settings = load_runtime_settings(args[1:], environ={})
    assert settings.audit_log == f"{AUDIT_DIR}/tensorwasm-shard-3.audit.log"
    assert next(v for v in pod["volumes"] if v["name"] == "audit") == {"name": "audit", **volume}
    assert {"name": "audit", "mountPath": AUDIT_DIR} in container["volumeMounts"]


@pytest.mark.parametrize("target", ["stdout", "off"])
def test_audit_stdout_or_off_needs_no_volume(target: str) -> None:
    pod = _pod(load_settings({"TENSORWASM_OPERATOR_SHARD_AUDIT_LOG": target}))
    args = [_expand(a, {"POD_NAME": "s-0", "POD_NAMESPACE": "tw"}) for a in pod["containers"][0]["args"]]
    assert load_runtime_settings(args[1:], environ={}).audit_log == target
    assert all(v["name"] != "audit" for v in pod["volumes"])


def test_an_unknown_audit_target_is_refused_by_name() -> None:
    with pytest.raises(
        SettingsError, match="SHARD_AUDIT_LOG must be one of stdout, off, file, got '/var/log/x'"
    ):
        load_settings({"TENSORWASM_OPERATOR_SHARD_AUDIT_LOG": "/var/log/x"})
