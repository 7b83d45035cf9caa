"""The Tenant and Snapshot CRDs as the real API server enforces and prints them (no operator)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tensorwasm.api.fields import fields_of
from tensorwasm.api.tenant import Limits

from .conftest import SHA, tenant_manifest


def apply(kube: Any, namespace: str, manifest: dict[str, Any]) -> tuple[int, str]:
    proc = kube.run_kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(manifest))
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"module": {"sha256": SHA}}, "exactly one of module.configMapRef or module.url must be set"),
        (
            {"module": {"url": "https://x/m.wasm", "configMapRef": {"name": "m"}, "sha256": SHA}},
            "exactly one of module.configMapRef or module.url must be set",
        ),
        ({"module": {"url": "https://x/m.wasm", "sha256": "ABC"}}, "should match '^[0-9a-f]{64}$'"),
        ({"module": {"url": "ftp://x/m.wasm", "sha256": SHA}}, "module.url must be an absolute http"),
        ({"module": {"url": "https://x/m.wasm"}}, "spec.module.sha256: Required value"),
        ({"functions": []}, "spec.functions: Invalid value"),
        ({"limits": {"gpuMemory": "lots"}}, "spec.limits.gpuMemory"),
        ({"limits": {"timeoutMs": 0}}, "spec.limits.timeoutMs"),
        # Quantity bounds are CEL rules generated from the spec model (tensorwasm.api.tenant).
        ({"limits": {"gpuMemory": 0}}, "gpuMemory must be a whole number of bytes from 1 to 512Ti"),
        # No integer bypass, no regex dump: the same plain message for every spelling.
        ({"limits": {"gpuMemory": -5}}, "spec.limits.gpuMemory: Invalid value: -5: gpuMemory must be"),
        ({"limits": {"gpuMemory": "12XB"}}, "gpuMemory must be a whole number of bytes from 1 to 512Ti, e"),
        ({"limits": {"gpuMemory": "-1Gi"}}, "gpuMemory must be a whole number of bytes from 1 to 512Ti, e"),
        (
            {"limits": {"linearMemory": "8Gi"}},
            "linearMemory must be a whole number of bytes from 64Ki to 4Gi",
        ),
        ({"limits": {"maxBodyBytes": "0.5"}}, "maxBodyBytes must be a whole number of bytes from 1 to 1Gi"),
        ({"limits": {"timeoutMs": 600_001}}, "spec.limits.timeoutMs"),
        ({"gpu": {"smPercent": 150}}, "spec.gpu.smPercent"),
        (
            {"snapshot": {"policy": "Periodic"}},
            "intervalSeconds is required when snapshot.policy is Periodic",
        ),
        ({"snapshot": {"policy": "Sometimes"}}, 'supported values: "Manual", "OnMove", "Periodic"'),
    ],
)
def test_invalid_tenants_are_refused_with_readable_messages(
    kube: Any, namespace: str, spec: dict[str, Any], message: str
) -> None:
    rc, err = apply(kube, namespace, tenant_manifest("bad", **spec))
    assert rc != 0
    assert message in err, err


def test_tenant_name_must_fit_a_service_name(kube: Any, namespace: str) -> None:
    rc, err = apply(kube, namespace, tenant_manifest("x" * 61))
    assert rc != 0 and "at most 60 characters" in err
    assert "metadata.name: Invalid value" in err and "<nil>" not in err, err


def test_a_refused_quantity_shows_no_regex(kube: Any, namespace: str) -> None:
    rc, err = apply(kube, namespace, tenant_manifest("bad", limits={"gpuMemory": "12XB"}))
    assert rc != 0 and "should match" not in err and "[KMGTPE]" not in err, err


def test_defaults_are_filled_and_columns_print(kube: Any, namespace: str) -> None:
    rc, err = apply(kube, namespace, tenant_manifest("alpha", limits={"gpuMemory": "256Mi"}))
    assert rc == 0, err
    got = json.loads(kube.kubectl("get", "twt", "alpha", "-n", namespace, "-o", "json"))
    # Every default the spec model declares (tensorwasm.api.tenant.Limits), filled in by the API server.
    defaults = {f.name: f.default for _, f in fields_of(Limits) if f.default is not None}
    assert got["spec"]["limits"] == {**defaults, "gpuMemory": "256Mi"}
    assert defaults["linearMemory"] == "64Mi" and defaults["timeoutMs"] == 1000
    header = kube.kubectl("get", "tenants", "-n", namespace).splitlines()[0].split()
    assert header == ["NAME", "PHASE", "SHARD", "GPU-CAP", "GPU-USED", "READY", "AGE"]
    wide = kube.kubectl("get", "tenants", "-n", namespace, "-o", "wide").splitlines()[0].split()
    assert wide == [*header, "ENDPOINT", "REASON", "MESSAGE"]
    row = kube.kubectl("get", "tenants", "-n", namespace).splitlines()[1].split()
    assert row[0] == "alpha" and "256Mi" in row


def test_snapshot_columns_and_immutable_tenant(kube: Any, namespace: str) -> None:
    snap = {"apiVersion": "tensorwasm.io/v1alpha1", "kind": "Snapshot", "metadata": {"name": "s1"},
            "spec": {"tenant": "alpha"}}  # fmt: skip
    assert apply(kube, namespace, snap)[0] == 0
    header = kube.kubectl("get", "tws", "-n", namespace).splitlines()[0].split()
    assert header == ["NAME", "TENANT", "PHASE", "SIZE", "STORED", "AGE"]
    snap["spec"] = {"tenant": "beta"}
    rc, err = apply(kube, namespace, snap)
    assert rc != 0 and "spec.tenant is immutable" in err


def test_samples_are_accepted(kube: Any, namespace: str) -> None:
    from pathlib import Path

    samples = sorted((Path(__file__).resolve().parents[2] / "crds" / "samples").glob("*.yaml"))
    assert samples
    for sample in samples:
        kube.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(sample))


def test_explain_has_descriptions(kube: Any) -> None:
    out = kube.kubectl("explain", "tenants.spec.limits.gpuMemory")
    described = next(f.description for _, f in fields_of(Limits) if f.name == "gpuMemory")
    assert " ".join(described.split()[:6]) in " ".join(out.split())  # the model's own words
