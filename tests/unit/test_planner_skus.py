"""The SKU catalog: the shipped reference SKUs and custom SKUs from YAML, with named errors."""

from __future__ import annotations

import pytest

from tensorwasm.planner.errors import PlanInputError
from tensorwasm.planner.skus import parse_catalog, reference_catalog

GI = 1 << 30


def test_reference_skus_match_the_capacity_model() -> None:
    c = reference_catalog()
    assert [s.name for s in c.skus] == ["Small", "Medium", "Large"]
    small, medium, large = c.skus
    assert (small.vcpu, small.memory_bytes, small.gpu.name, small.mps) == (4, 16 * GI, "T4", False)
    assert (medium.vcpu, medium.memory_bytes, medium.tenant_ceiling, medium.qps_ceiling) == (
        16,
        64 * GI,
        50,
        1000,
    )
    assert (large.vcpu, large.memory_bytes, large.tenant_ceiling) == (32, 128 * GI, 500)
    assert (large.snapshots_in_flight, large.snapshot_payload_bytes) == (16, 128 << 20)
    assert c.sku("medium") is medium


CUSTOM = """
gpus:
  MyGPU: {memory: 48Gi, bandwidth: 864GB/s}
skus:
  - name: L40S-box
    vcpu: 24
    memory: 96Gi
    gpu: MyGPU
    diskIops: 15000
  - name: Inline
    vcpu: 8
    memory: 32Gi
    gpu: Whatever
    gpuMemory: 12Gi
    diskIops: 5000
    mps: false
"""


def test_custom_skus_extend_the_reference_set() -> None:
    c = parse_catalog(CUSTOM, base=reference_catalog(), source="mine.yaml")
    assert [s.name for s in c.skus] == ["Small", "Medium", "Large", "L40S-box", "Inline"]
    box = c.sku("L40S-box")
    assert box.gpu.memory_bytes == 48 * GI and not box.builtin and box.to_json()["source"] == "custom"
    assert c.sku("Inline").gpu.memory_bytes == 12 * GI and c.sku("Inline").mps is False
    assert "H100-80GB" in c.gpus


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("skus: []", "skus"),
        ("skus: [{name: X, vcpu: 4, memory: 16, gpu: T4, diskIops: 100}]", r"skus\[X\]\.memory"),
        ("skus: [{name: X, vcpu: -4, memory: 16Gi, gpu: T4, diskIops: 100}]", r"skus\[X\]\.vcpu"),
        ("skus: [{name: X, memory: 16Gi, gpu: T4, diskIops: 100}]", r"skus\[X\]\.vcpu.*required"),
        ("skus: [{name: X, vcpu: 4, memory: 16Gi, gpu: Nope, diskIops: 100}]", r"skus\[X\]\.gpu"),
        (
            "skus: [{name: X, vcpu: 4, memory: 16Gi, gpu: T4, diskIops: 100, colour: red}]",
            r"skus\[X\]\.colour",
        ),
        ("skus: [{name: Small, vcpu: 4, memory: 16Gi, gpu: T4, diskIops: 100}]", "duplicate"),
        ("gpus: {G: {memory: 1Gi}}\nskus: [{name: X}]", r"gpus\.G\.bandwidth"),
        ("skus: [", "not valid YAML"),
    ],
)
def test_bad_sku_files_name_the_field(text: str, field: str) -> None:
    with pytest.raises(PlanInputError, match=field):
        parse_catalog(text, base=reference_catalog(), source="mine.yaml")
