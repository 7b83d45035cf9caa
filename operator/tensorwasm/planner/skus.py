"""Host SKUs and GPU models: the reference set shipped as YAML, plus custom SKUs from a user file.

Owns parsing and validating SKU documents (every key named in errors). Reads YAML text it is
given or the packaged skus.yaml; must not import matplotlib or the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from tensorwasm.planner.errors import PlanInputError
from tensorwasm.planner.units import parse_bandwidth, parse_bytes, parse_number

_SKU_KEYS = {
    "name", "purpose", "vcpu", "memory", "gpu", "gpuMemory", "bandwidth", "mps", "diskIops",
    "tenantCeiling", "qpsCeiling", "snapshotBuffer",
}  # fmt: skip


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bandwidth_bytes_per_s: float


@dataclass(frozen=True)
class Sku:
    name: str
    purpose: str
    vcpu: int
    memory_bytes: int
    gpu: Gpu
    mps: bool
    disk_iops: int
    tenant_ceiling: int
    qps_ceiling: float
    snapshots_in_flight: int
    snapshot_payload_bytes: int
    builtin: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "purpose": self.purpose,
            "vcpu": self.vcpu,
            "memoryBytes": self.memory_bytes,
            "gpu": self.gpu.name,
            "gpuMemoryBytes": self.gpu.memory_bytes,
            "gpuBandwidthBytesPerSecond": self.gpu.bandwidth_bytes_per_s,
            "mps": self.mps,
            "diskIops": self.disk_iops,
            "tenantCeiling": self.tenant_ceiling,
            "qpsCeiling": self.qps_ceiling,
            "snapshotBuffer": {
                "inFlight": self.snapshots_in_flight,
                "payloadBytes": self.snapshot_payload_bytes,
            },
            "source": "reference" if self.builtin else "custom",
        }


@dataclass(frozen=True)
class Catalog:
    gpus: dict[str, Gpu]
    skus: tuple[Sku, ...]

    def sku(self, name: str) -> Sku:
        for sku in self.skus:
            if sku.name.lower() == name.lower():
                return sku
        known = ", ".join(s.name for s in self.skus)
        raise PlanInputError("--sku", f"unknown SKU {name!r}; known: {known}")


def _mapping(field: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PlanInputError(field, f"expected a mapping, got {type(value).__name__}")
    return value


def _required(doc: dict[str, Any], field: str, key: str) -> Any:
    if key not in doc or doc[key] is None:
        raise PlanInputError(f"{field}.{key}", "is required")
    return doc[key]


def _parse_gpus(doc: object) -> dict[str, Gpu]:
    gpus: dict[str, Gpu] = {}
    for name, spec in _mapping("gpus", doc).items():
        field = f"gpus.{name}"
        body = _mapping(field, spec)
        gpus[str(name)] = Gpu(
            name=str(name),
            memory_bytes=parse_bytes(f"{field}.memory", _required(body, field, "memory"), allow_zero=False),
            bandwidth_bytes_per_s=parse_bandwidth(f"{field}.bandwidth", _required(body, field, "bandwidth")),
        )
    return gpus


def _parse_sku(doc: object, index: int, gpus: dict[str, Gpu], builtin: bool) -> Sku:
    body = _mapping(f"skus[{index}]", doc)
    name = str(_required(body, f"skus[{index}]", "name"))
    field = f"skus[{name}]"
    unknown = sorted(set(body) - _SKU_KEYS)
    if unknown:
        raise PlanInputError(f"{field}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_SKU_KEYS))})")
    gpu_name = str(_required(body, field, "gpu"))
    if gpu_name in gpus and "gpuMemory" not in body:
        gpu = gpus[gpu_name]
    elif "gpuMemory" in body:
        # A custom GPU described inline; bandwidth only matters to LLM mode, so default it to unknown-low.
        gpu = Gpu(
            name=gpu_name,
            memory_bytes=parse_bytes(f"{field}.gpuMemory", body["gpuMemory"], allow_zero=False),
            bandwidth_bytes_per_s=parse_bandwidth(f"{field}.bandwidth", body.get("bandwidth", "100GB/s")),
        )
    else:
        raise PlanInputError(
            f"{field}.gpu",
            f"unknown GPU {gpu_name!r}; give gpuMemory (and bandwidth) or one of {', '.join(gpus)}",
        )
    snap = _mapping(f"{field}.snapshotBuffer", body.get("snapshotBuffer", {"inFlight": 1, "payload": "64Mi"}))
    mps = body.get("mps", True)
    if not isinstance(mps, bool):
        raise PlanInputError(f"{field}.mps", f"must be true or false, got {mps!r}")
    return Sku(
        name=name,
        purpose=str(body.get("purpose", "custom")),
        vcpu=int(
            parse_number(
                f"{field}.vcpu", _required(body, field, "vcpu"), minimum=1, maximum=4096, integer=True
            )
        ),
        memory_bytes=parse_bytes(f"{field}.memory", _required(body, field, "memory"), allow_zero=False),
        gpu=gpu,
        mps=mps,
        disk_iops=int(
            parse_number(
                f"{field}.diskIops", _required(body, field, "diskIops"), minimum=1, maximum=1e8, integer=True
            )
        ),
        tenant_ceiling=int(
            parse_number(
                f"{field}.tenantCeiling",
                body.get("tenantCeiling", 100000),
                minimum=1,
                maximum=1e6,
                integer=True,
            )
        ),
        qps_ceiling=parse_number(f"{field}.qpsCeiling", body.get("qpsCeiling", 1e9), minimum=0, maximum=1e9),
        snapshots_in_flight=int(
            parse_number(
                f"{field}.snapshotBuffer.inFlight", snap.get("inFlight", 1), maximum=1e4, integer=True
            )
        ),
        snapshot_payload_bytes=parse_bytes(f"{field}.snapshotBuffer.payload", snap.get("payload", "64Mi")),
        builtin=builtin,
    )


def parse_catalog(text: str, *, base: Catalog | None = None, source: str = "skus file") -> Catalog:
    """Parse a SKU document; with `base`, its GPUs are known and its SKUs come first."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlanInputError(source, f"not valid YAML: {exc}") from exc
    body = _mapping(source, doc)
    gpus = dict(base.gpus) if base else {}
    gpus.update(_parse_gpus(body.get("gpus", {})))
    raw_skus = body.get("skus")
    if not isinstance(raw_skus, list) or not raw_skus:
        raise PlanInputError(f"{source}: skus", "must be a non-empty list")
    builtin = base is None
    skus = [_parse_sku(item, i, gpus, builtin) for i, item in enumerate(raw_skus)]
    names = [s.name.lower() for s in skus] + ([s.name.lower() for s in base.skus] if base else [])
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PlanInputError(f"{source}: skus", f"duplicate SKU name {dupes[0]!r}")
    return Catalog(gpus=gpus, skus=(*(base.skus if base else ()), *skus))


def reference_catalog() -> Catalog:
    """The Small / Medium / Large reference SKUs shipped in the package."""
    text = resources.files("tensorwasm.planner").joinpath("skus.yaml").read_text(encoding="utf-8")
    return parse_catalog(text, source="skus.yaml")
