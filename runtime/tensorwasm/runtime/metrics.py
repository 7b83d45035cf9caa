"""Every tensorwasm_* Prometheus metric of the runtime shard, defined in one place.

Names follow Prometheus conventions: tensorwasm_<noun>_<unit> with _total/_seconds/_bytes suffixes.
Every metric registers in `REGISTRY` (what /metrics serves). Each part of the runtime owns one section
below; hot paths cache labelled children once instead of calling `.labels()` per event.
Must not import wasmtime, cuda or aiohttp.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

# --- invoke path (runtime server) ---

INVOCATIONS = Counter(
    "tensorwasm_invocations_total",
    "Invocations by tenant, function and outcome (ok or the error kind).",
    ["tenant", "function", "outcome"],
    registry=REGISTRY,
)
INVOKE_SECONDS = Histogram(
    "tensorwasm_invoke_duration_seconds",
    "Invoke latency as the HTTP layer sees it: queue wait + thread hop + guest run.",
    ["tenant", "function"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)


@dataclass(frozen=True)
class TenantLoad:
    """One tenant's admission state at scrape time (the autoscaling signal)."""

    tenant: str
    queue_depth: int
    in_flight: int
    loaded: bool


class TenantLoadCollector(Collector):
    """Reads queue depth and in-flight counts at scrape time, so the invoke path updates no gauge."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[TenantLoad]] = lambda: ()

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "tensorwasm_queue_depth",
            "Invokes admitted and waiting for a worker, per tenant.",
            labels=["tenant"],
        )
        running = GaugeMetricFamily(
            "tensorwasm_invocations_in_flight", "Invokes running now, per tenant.", labels=["tenant"]
        )
        loaded = GaugeMetricFamily(
            "tensorwasm_tenant_loaded", "1 when the tenant's module is loaded and serving.", labels=["tenant"]
        )
        for t in self.source():
            depth.add_metric([t.tenant], t.queue_depth)
            running.add_metric([t.tenant], t.in_flight)
            loaded.add_metric([t.tenant], 1.0 if t.loaded else 0.0)
        yield from (depth, running, loaded)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked collector: nothing is collected at registration


TENANT_LOAD = TenantLoadCollector()
REGISTRY.register(TENANT_LOAD)

# --- engine (compile, instances) ---

# --- GPU backend (accelerator, caps, NVML, MPS) ---

# --- snapshots ---

_SNAPSHOT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SNAPSHOT_RESTORE_PHASE_SECONDS = Histogram(
    "tensorwasm_snapshot_restore_phase_seconds",
    "Snapshot restore time per phase: read, verify, decompress, upload, instantiate, total.",
    ["phase"],
    buckets=_SNAPSHOT_BUCKETS,
    registry=REGISTRY,
)
SNAPSHOT_CAPTURE_PHASE_SECONDS = Histogram(
    "tensorwasm_snapshot_capture_phase_seconds",
    "Snapshot capture time per phase: barrier (tenant paused), encode, commit (fsync + rename), total.",
    ["phase"],
    buckets=_SNAPSHOT_BUCKETS,
    registry=REGISTRY,
)
SNAPSHOT_BYTES = Counter(
    "tensorwasm_snapshot_bytes_total",
    "Bytes through snapshots by direction (capture/restore) and form (raw = tenant state, stored = blob).",
    ["direction", "form"],
    registry=REGISTRY,
)
SNAPSHOT_REJECTED = Counter(
    "tensorwasm_snapshot_rejected_total",
    "Snapshot restores refused before any tenant state changed.",
    registry=REGISTRY,
)
