"""Shard admission: the fit test, the binding resource and its message."""

from __future__ import annotations

import pytest

from tensorwasm.api.fields import InvalidSpec
from tensorwasm.api.tenant import parse_spec
from tensorwasm.planner.admission import (
    INSTANCE_OVERHEAD_BYTES,
    RESOURCE_ORDER,
    ShardCapacity,
    ShardUsage,
    TenantDemand,
    admit_spec,
    binding_resource,
    insufficient_capacity_message,
    tenant_demand,
)

MI = 1 << 20
GI = 1 << 30

SPEC = {"module": {"url": "https://x/m.wasm", "sha256": "a" * 64}, "functions": ["f"]}
SHARD = ShardCapacity(gpu_memory_bytes=3 * GI, sm_percent=100, host_memory_bytes=4 * GI, max_tenants=8)


def test_tenant_demand_counts_one_instance_per_concurrent_invoke() -> None:
    limits = {"gpuMemory": "256Mi", "linearMemory": "64Mi", "maxConcurrency": 4}
    demand = tenant_demand(parse_spec({**SPEC, "limits": limits, "gpu": {"smPercent": 25}}))
    assert demand == TenantDemand(256 * MI, 25, 4 * (64 * MI + INSTANCE_OVERHEAD_BYTES))


def test_gpu_memory_has_fragmentation_headroom() -> None:
    # 3 GiB slice / 1.5 = 2 GiB of caps: exactly 2 GiB fits, a byte more does not.
    demand = TenantDemand(gpu_memory_bytes=1 * GI, sm_percent=0, host_memory_bytes=0)
    assert binding_resource(SHARD, ShardUsage(gpu_memory_bytes=1 * GI, tenants=1), demand) is None
    over = TenantDemand(gpu_memory_bytes=1 * GI + 1, sm_percent=0, host_memory_bytes=0)
    assert binding_resource(SHARD, ShardUsage(gpu_memory_bytes=1 * GI, tenants=1), over) == "gpuMemory"


def test_accounting_only_tenant_never_binds_on_gpu() -> None:
    full = ShardUsage(gpu_memory_bytes=2 * GI, sm_percent=100, tenants=1)
    demand = TenantDemand(gpu_memory_bytes=0, sm_percent=0, host_memory_bytes=MI)
    assert binding_resource(SHARD, full, demand) is None


def test_sm_percent_sums() -> None:
    used = ShardUsage(sm_percent=80, tenants=1)
    assert binding_resource(SHARD, used, TenantDemand(0, 20, 0)) is None
    assert binding_resource(SHARD, used, TenantDemand(0, 21, 0)) == "smPercent"


def test_host_memory_and_tenant_count() -> None:
    used = ShardUsage(host_memory_bytes=3 * GI, tenants=7)
    assert binding_resource(SHARD, used, TenantDemand(0, 0, GI)) is None
    assert binding_resource(SHARD, used, TenantDemand(0, 0, GI + 1)) == "hostMemory"
    assert binding_resource(SHARD, ShardUsage(tenants=8), TenantDemand(0, 0, 0)) == "tenants"


def test_first_exceeded_resource_in_documented_order() -> None:
    assert RESOURCE_ORDER == ("gpuMemory", "smPercent", "hostMemory", "tenants")
    used = ShardUsage(gpu_memory_bytes=2 * GI, sm_percent=100, host_memory_bytes=4 * GI, tenants=8)
    assert binding_resource(SHARD, used, TenantDemand(MI, 1, MI)) == "gpuMemory"
    assert binding_resource(SHARD, used, TenantDemand(0, 1, MI)) == "smPercent"
    assert binding_resource(SHARD, used, TenantDemand(0, 0, MI)) == "hostMemory"


def test_usage_plus_accumulates() -> None:
    demand = TenantDemand(MI, 10, 2 * MI)
    # The tenants follow the shards' default idle.after (sleeps None): their share is tracked apart too,
    # with the sums of squares that give sleepers their room (tests/unit/test_admission_sleepers.py).
    assert ShardUsage().plus(demand).plus(demand) == ShardUsage(
        2 * MI, 20, 4 * MI, 2, gpu_default=2 * MI, host_default=4 * MI,
        gpu_default_sq=2 * MI * MI, host_default_sq=2 * (2 * MI) ** 2,
    )  # fmt: skip


def test_message_names_resource_and_figures() -> None:
    used = ShardUsage(gpu_memory_bytes=GI + 512 * MI, tenants=1)
    demand = TenantDemand(gpu_memory_bytes=GI, sm_percent=0, host_memory_bytes=0)
    resource = binding_resource(SHARD, used, demand)
    assert resource == "gpuMemory"
    message = insufficient_capacity_message(SHARD, used, demand, resource)
    assert message.startswith("insufficient gpuMemory")
    assert "3.8Gi" in message and "3Gi" in message and "1.5x" in message
    tenants = insufficient_capacity_message(SHARD, ShardUsage(tenants=8), TenantDemand(0, 0, 0), "tenants")
    assert "tenants" in tenants and "9" in tenants and "8" in tenants


def test_admission_refuses_what_the_spec_model_refuses() -> None:
    # No second validator: an invalid spec never becomes a demand (issue 12's gpuMemory 0 verdict).
    with pytest.raises(InvalidSpec, match=r"spec\.limits\.gpuMemory"):
        admit_spec({**SPEC, "limits": {"gpuMemory": 0}})
    assert admit_spec(SPEC).gpu_memory_bytes == 0  # absent: accounting only, reserves nothing


def test_bad_capacity_and_resource_name() -> None:
    with pytest.raises(ValueError, match="smPercent"):
        ShardCapacity(GI, 150, GI, 1)
    with pytest.raises(ValueError, match="maxTenants"):
        ShardCapacity(GI, 100, GI, -1)
    with pytest.raises(ValueError, match="resource"):
        insufficient_capacity_message(SHARD, ShardUsage(), TenantDemand(0, 0, 0), "cpu")
