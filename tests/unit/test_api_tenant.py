"""The Tenant spec model: defaults, bounds and messages that name the field, as every reader sees them."""

from __future__ import annotations

import pytest

from tensorwasm.api.fields import InvalidSpec
from tensorwasm.api.quantity import format_quantity, quantity_bytes
from tensorwasm.api.tenant import Limits, parse_spec, parse_tenant

SHA = "a" * 64


def spec(**over: object) -> dict[str, object]:
    return {"module": {"url": "https://x/m.wasm", "sha256": SHA}, "functions": ["echo"], **over}


def body(**over: object) -> dict[str, object]:
    meta = {"name": "alpha", "namespace": "ns", "uid": "u1", "generation": 2, "resourceVersion": "7"}
    return {"metadata": meta, "spec": spec(**over)}


@pytest.mark.parametrize(
    ("value", "expected"),
    [("256Mi", 256 << 20), ("1Gi", 1 << 30), ("2k", 2000), (4096, 4096), ("1.5Ki", 1536), ("0", 0)],
)
def test_quantities(value: object, expected: int) -> None:
    assert quantity_bytes(value) == expected


@pytest.mark.parametrize("value", ["12x", "-1", "0.5", True, None, -3, "1.1", " 1Mi", "1Mi\n"])
def test_bad_quantities(value: object) -> None:
    with pytest.raises(ValueError):
        quantity_bytes(value)


def test_format_quantity_is_exact() -> None:
    assert [format_quantity(v) for v in (0, 1000, 64 << 10, 1 << 30, 1536)] == [
        "0",
        "1000",
        "64Ki",
        "1Gi",
        "1536",
    ]


def test_defaults_are_the_crd_defaults() -> None:
    parsed = parse_spec(spec())
    assert parsed.limits == Limits() and parsed.limits.linear_memory_bytes == 64 << 20
    assert (parsed.limits.timeout_ms, parsed.limits.max_body_bytes, parsed.limits.gpu_memory_bytes) == (
        1000, 1 << 20, None,
    )  # fmt: skip
    assert parsed.sm_percent == 0 and parsed.gpu.sm_percent is None
    assert (parsed.snapshot.policy, parsed.snapshot.retain) == ("OnMove", 3)
    assert parsed.module.config_map is None and parsed.module.url == "https://x/m.wasm"


def test_typed_fields() -> None:
    tenant = parse_tenant(
        body(
            limits={"gpuMemory": "256Mi", "maxConcurrency": 2}, gpu={"smPercent": 25},
            module={"configMapRef": {"name": "m"}, "sha256": SHA}, authSecretRef={"name": "mine"},
            kernels=[{"name": "k", "configMapRef": {"name": "ptx"}}],
        )
    )  # fmt: skip
    assert tenant.spec_error is None and tenant.spec is not None
    assert tenant.spec.limits == Limits(gpu_memory_bytes=256 << 20, max_concurrency=2)
    assert tenant.spec.sm_percent == 25
    assert tenant.spec.module.config_map is not None and tenant.spec.module.config_map.key == "module.wasm"
    assert tenant.spec.kernels[0].config_map.key == "kernel.ptx"
    assert tenant.token_secret == "mine"
    assert (tenant.name, tenant.namespace, tenant.generation) == ("alpha", "ns", 2)
    assert parse_tenant(body()).token_secret == "tw-alpha-token"


@pytest.mark.parametrize(
    ("over", "message"),
    [
        # The four disagreements of issue 12, with their one verdict each.
        ({"limits": {"gpuMemory": 0}}, "spec.limits.gpuMemory: must be at least 1 bytes, got 0 bytes"),
        ({"limits": {"maxBodyBytes": "0"}}, "spec.limits.maxBodyBytes: must be at least 1 bytes"),
        ({"limits": {"timeoutMs": 600_001}}, "spec.limits.timeoutMs: must be at most 600000, got 600001"),
        ({"gpu": {"smPercent": 0}}, "spec.gpu.smPercent: must be at least 1, got 0"),
        (
            {"limits": {"linearMemory": "8Gi"}},
            "spec.limits.linearMemory: must be at most 4Gi (4294967296 bytes)",
        ),
        ({"limits": {"linearMemory": "1Ki"}}, "must be at least 64Ki (65536 bytes), got 1024 bytes"),
        ({"limits": {"gpuMemory": "lots"}}, "spec.limits.gpuMemory: must be a quantity"),
        ({"limits": {"maxConcurrency": "4"}}, "spec.limits.maxConcurrency: must be an integer"),
        ({"module": {"sha256": SHA}}, "spec.module: exactly one of module.configMapRef or module.url"),
        ({"module": {"url": "ftp://x/m", "sha256": SHA}}, "spec.module.url: module.url must be an absolute"),
        ({"module": {"url": "https://x/m", "sha256": "A" * 64}}, "spec.module.sha256: 'AAAA"),
        ({"functions": []}, "spec.functions: must have at least 1 item"),
        ({"functions": ["a", "a"]}, "spec.functions: lists a value twice"),
        ({"functions": ["1x"]}, "spec.functions[0]: '1x' does not match"),
        (
            {"snapshot": {"policy": "Periodic"}},
            "spec.snapshot.intervalSeconds: snapshot.intervalSeconds is required",
        ),
        (
            {"snapshot": {"policy": "Sometimes"}},
            "spec.snapshot.policy: must be one of Manual, OnMove, Periodic",
        ),
        ({"kernels": [{"name": "k", "configMapRef": {"name": "a"}}] * 2}, "spec.kernels: lists name twice"),
    ],
)
def test_invalid_spec_names_the_field(over: dict[str, object], message: str) -> None:
    tenant = parse_tenant(body(**over))
    assert tenant.spec is None
    assert tenant.spec_error is not None and message in tenant.spec_error
    with pytest.raises(InvalidSpec):
        parse_spec(spec(**over))


def test_a_missing_spec_is_invalid_not_a_crash() -> None:
    tenant = parse_tenant({"metadata": {"name": "a"}})
    assert tenant.spec is None and tenant.spec_error == "spec.module: is required"


def test_runtime_report_is_parsed() -> None:
    b = body()
    b["status"] = {
        "shard": "s-1",
        "runtime": {"shard": "s-1", "observedGeneration": 2, "loaded": True, "gpuBytesInUse": 10},
    }
    tenant = parse_tenant(b)
    assert tenant.shard == "s-1"
    assert tenant.runtime is not None and tenant.runtime.loaded and tenant.runtime.gpu_bytes_in_use == 10


def test_a_tenants_spec_is_parsed_again_only_when_it_changed() -> None:
    first = parse_tenant(body())
    again = parse_tenant({**body(), "status": {"phase": "Ready"}})  # a status write: same spec
    assert again.spec is first.spec and again.status == {"phase": "Ready"}
    changed = parse_tenant(body(functions=["echo", "other"]))  # same uid, new spec: a new verdict
    assert changed.spec is not None and changed.spec.functions == ("echo", "other")
    bad = parse_tenant(body(limits={"gpuMemory": "-5"}))
    assert bad.spec is None and bad.spec_error and "gpuMemory" in bad.spec_error
    assert parse_tenant(body()).spec == first.spec  # back to the first spec: parsed again, equal
    other_uid = parse_tenant({**body(), "metadata": {**body()["metadata"], "uid": "u2"}})  # type: ignore[dict-item]
    assert other_uid.spec == first.spec and other_uid.spec is not first.spec
