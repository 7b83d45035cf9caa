"""Tenant parsing and operator settings: bad input gets a message naming the field."""

from __future__ import annotations

import pytest

from tensorwasm.operator.models import Limits, parse_tenant
from tensorwasm.operator.models.quantity import parse_bytes
from tensorwasm.operator.settings import SettingsError, load_settings

SHA = "a" * 64


def body(**spec: object) -> dict[str, object]:
    base: dict[str, object] = {"module": {"url": "https://x/m.wasm", "sha256": SHA}, "functions": ["echo"]}
    base.update(spec)
    meta = {"name": "alpha", "namespace": "ns", "uid": "u1", "generation": 2, "resourceVersion": "7"}
    return {"metadata": meta, "spec": base}


@pytest.mark.parametrize(
    ("value", "expected"),
    [("256Mi", 256 << 20), ("1Gi", 1 << 30), ("2k", 2000), (4096, 4096), ("1.5Ki", 1536), ("0", 0)],
)
def test_quantities(value: object, expected: int) -> None:
    assert parse_bytes("f", value) == expected


@pytest.mark.parametrize("value", ["12x", "-1", "0.5", True, None, -3, "1.1"])
def test_bad_quantities_name_the_field(value: object) -> None:
    with pytest.raises(ValueError, match=r"spec\.limits\.gpuMemory"):
        parse_bytes("spec.limits.gpuMemory", value)


def test_defaults_and_typed_limits() -> None:
    tenant = parse_tenant(body(limits={"gpuMemory": "256Mi", "maxConcurrency": 2}, gpu={"smPercent": 25}))
    assert tenant.spec_error is None and tenant.spec is not None
    assert tenant.spec.limits == Limits(gpu_memory_bytes=256 << 20, max_concurrency=2)
    assert tenant.spec.sm_percent == 25
    assert (tenant.name, tenant.namespace, tenant.generation) == ("alpha", "ns", 2)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"limits": {"linearMemory": "8Gi"}}, "linearMemory must be between 64Ki"),
        ({"limits": {"gpuMemory": "lots"}}, "spec.limits.gpuMemory must be a quantity"),
        ({"module": {"sha256": SHA}}, "exactly one of"),
        ({"functions": []}, "at least one"),
        ({"limits": {"maxConcurrency": "4"}}, "maxConcurrency must be an integer"),
    ],
)
def test_invalid_spec_becomes_spec_error(spec: dict[str, object], message: str) -> None:
    tenant = parse_tenant(body(**spec))
    assert tenant.spec is None
    assert tenant.spec_error is not None and message in tenant.spec_error


def test_runtime_report_is_parsed() -> None:
    b = body()
    b["status"] = {
        "shard": "s-1",
        "runtime": {"shard": "s-1", "observedGeneration": 2, "loaded": True, "gpuBytesInUse": 10},
    }
    tenant = parse_tenant(b)
    assert tenant.shard == "s-1"
    assert tenant.runtime is not None and tenant.runtime.loaded and tenant.runtime.gpu_bytes_in_use == 10


def test_settings_from_env() -> None:
    s = load_settings(
        {
            "TENSORWASM_OPERATOR_NAMESPACE": "tw",
            "TENSORWASM_OPERATOR_SHARDS": "3",
            "TENSORWASM_OPERATOR_SHARD_GPU_MEMORY": "8Gi",
            "TENSORWASM_OPERATOR_SHARD_TOLERATIONS": '[{"operator": "Exists"}]',
        }
    )
    assert (s.namespace, s.shards, s.shard_capacity.gpu_memory_bytes) == ("tw", 3, 8 << 30)
    assert s.shard_tolerations == ({"operator": "Exists"},)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TENSORWASM_OPERATOR_SHARDS": "two"}, "TENSORWASM_OPERATOR_SHARDS must be an integer"),
        ({"TENSORWASM_OPERATOR_SHARDS": "0"}, "TENSORWASM_OPERATOR_SHARDS must be between 1"),
        ({"TENSORWASM_OPERATOR_SHARD_GPU_MEMORY": "big"}, "SHARD_GPU_MEMORY must be a quantity"),
        ({"TENSORWASM_OPERATOR_STANDALONE": "maybe"}, "STANDALONE must be true or false"),
        ({"TENSORWASM_OPERATOR_SHARD_NODE_SELECTOR": "[1]"}, "must be a JSON dict"),
        ({"TENSORWASM_OPERATOR_LOG_LEVEL": "loud"}, "LOG_LEVEL must be"),
        ({"TENSORWASM_OPERATOR_SHARD_MPS_PIPE_DIR": "mps"}, "SHARD_MPS_PIPE_DIR must be an absolute path"),
    ],
)
def test_bad_settings_fail_fast(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(env)
