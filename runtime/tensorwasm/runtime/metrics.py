"""Every tensorwasm_* Prometheus metric of the runtime shard, defined in one place.

Names follow Prometheus conventions: tensorwasm_<noun>_<unit> with _total/_seconds/_bytes suffixes.
Every metric registers in `REGISTRY` (what /metrics serves). Each part of the runtime owns one section
below; hot paths cache labelled children once instead of calling `.labels()` per event, or keep
plain numbers that a collector reads at scrape time.
Must not import wasmtime, cuda or aiohttp.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

# --- invoke path (runtime server) ---

INVOKE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip


class InvokeStats:
    """Counters and latency buckets of one (tenant, function), kept as plain numbers.

    Only the event-loop thread updates them and /metrics reads them on that same thread, so the
    invoke path takes no lock (prometheus_client's Counter/Histogram take one per update).
    """

    __slots__ = ("buckets", "outcomes", "total_s")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.buckets = [0] * (len(INVOKE_BUCKETS) + 1)  # last one is +Inf
        self.total_s = 0.0

    def record(self, outcome: str, seconds: float | None) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if seconds is not None:
            self.buckets[bisect_left(INVOKE_BUCKETS, seconds)] += 1
            self.total_s += seconds


class InvokeCollector(Collector):
    """tensorwasm_invocations_total{tenant,function,outcome} and tensorwasm_invoke_duration_seconds."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[tuple[str, str, InvokeStats]]] = lambda: ()

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "tensorwasm_invocations",
            "Invocations by tenant, function and outcome (ok or the error kind).",
            labels=["tenant", "function", "outcome"],
        )
        latency = HistogramMetricFamily(
            "tensorwasm_invoke_duration_seconds",
            "Invoke latency as the HTTP layer sees it: queue wait + thread hop + guest run.",
            labels=["tenant", "function"],
        )
        for tenant, function, stats in self.source():
            for outcome, n in stats.outcomes.items():
                calls.add_metric([tenant, function, outcome], n)
            cumulative, buckets = 0, []
            for le, n in zip((*INVOKE_BUCKETS, float("inf")), stats.buckets, strict=True):
                cumulative += n
                buckets.append((_go_float(le), cumulative))
            if cumulative:
                latency.add_metric([tenant, function], buckets, stats.total_s)
        yield from (calls, latency)

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _go_float(value: float) -> str:
    """Bucket bound as Prometheus writes it ("+Inf", "0.005", "1.0")."""
    return "+Inf" if value == float("inf") else repr(float(value))


INVOKES = InvokeCollector()
REGISTRY.register(INVOKES)


@dataclass(frozen=True)
class TenantLoad:
    """One tenant's admission state at scrape time (the autoscaling signal)."""

    tenant: str
    queue_depth: int
    in_flight: int
    loaded: bool
    capacity: int = 0  # maxConcurrency + queueLength: admitted past this is 429 (0: not serving)


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
        capacity = GaugeMetricFamily(
            "tensorwasm_tenant_queue_capacity",
            "Invokes the tenant admits at once (maxConcurrency + queueLength); one more is refused "
            "with 429. (queue_depth + in_flight) / capacity is its saturation, 0..1.",
            labels=["tenant"],
        )
        for t in self.source():
            depth.add_metric([t.tenant], t.queue_depth)
            running.add_metric([t.tenant], t.in_flight)
            loaded.add_metric([t.tenant], 1.0 if t.loaded else 0.0)
            if t.capacity:
                capacity.add_metric([t.tenant], t.capacity)
        yield from (depth, running, loaded, capacity)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked collector: nothing is collected at registration


TENANT_LOAD = TenantLoadCollector()
REGISTRY.register(TENANT_LOAD)

QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class QueueWaitCollector(Collector):
    """tensorwasm_queue_wait_seconds: admission to a worker starting the invoke, all tenants of the shard.

    One shard-wide histogram (no tenant label: the per-tenant view is invoke_duration_seconds), kept as
    plain numbers that only the event-loop thread updates (TenantQueue hands waits back to it).
    A gauge sampled per scrape misses a burst between two scrapes; this counts every wait.
    """

    def __init__(self) -> None:
        self.buckets = [0] * (len(QUEUE_WAIT_BUCKETS) + 1)  # last one is +Inf
        self.total_s = 0.0

    def record(self, seconds: float) -> None:
        self.buckets[bisect_left(QUEUE_WAIT_BUCKETS, seconds)] += 1
        self.total_s += seconds

    def collect(self) -> Iterator[Metric]:
        wait = HistogramMetricFamily(
            "tensorwasm_queue_wait_seconds",
            "Time an admitted invoke waited for one of its tenant's workers (0 when one was free).",
        )
        cumulative, buckets = 0, []
        for le, n in zip((*QUEUE_WAIT_BUCKETS, float("inf")), self.buckets, strict=True):
            cumulative += n
            buckets.append((_go_float(le), cumulative))
        wait.add_metric([], buckets, self.total_s)
        yield wait

    def describe(self) -> Iterator[Metric]:
        return iter(())


QUEUE_WAIT = QueueWaitCollector()
REGISTRY.register(QUEUE_WAIT)

# --- engine (compile, instances) ---

INSTANCE_SPAWNS = Counter(
    "tensorwasm_instance_spawns_total",
    "Wasm instances created per tenant: the warm pool at load, plus replacements after traps.",
    ["tenant"],
    registry=REGISTRY,
)
MODULE_COMPILE_SECONDS = Histogram(
    "tensorwasm_module_compile_seconds",
    "Time to validate and compile a module (cache=miss) or load it from the disk cache (cache=hit).",
    ["cache"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
GUEST_LOG_LINES_DROPPED = Counter(
    "tensorwasm_guest_log_lines_dropped_total",
    "Guest log lines not written because the tenant passed its log byte budget (per invoke or per second).",
    ["tenant"],
    registry=REGISTRY,
)
GUEST_LIMIT_HITS = Counter(
    "tensorwasm_guest_limit_exceeded_total",
    "Invokes or loads stopped by a guest resource limit, by tenant and limit "
    "(hostCalls, maxOutputBytes, tableElements, ...).",
    ["tenant", "limit"],
    registry=REGISTRY,
)

# --- GPU backend (accelerator, caps, NVML, MPS) ---

GPU_ALLOC_REFUSED = Counter(
    "tensorwasm_gpu_alloc_refused_total",
    "GPU allocations refused, by tenant and layer (host = the byte counter, driver = the tenant pool).",
    ["tenant", "layer"],
    registry=REGISTRY,
)


def count_gpu_refusal(tenant: str, layer: str) -> None:
    """Refusals are rare (cold path): a .labels() lookup here costs nothing on successful allocations."""
    GPU_ALLOC_REFUSED.labels(tenant, layer).inc()


@dataclass(frozen=True)
class GpuDeviceSample:
    """One GPU as NVML reports it."""

    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_ratio: float
    temperature_celsius: float


@dataclass(frozen=True)
class GpuBackendSample:
    """The accelerator's state at scrape time. tenants: (tenant, bytes in use, cap, pool reserved)."""

    backend: str
    requested: str
    device: str
    fallback_reason: str
    healthy: bool
    health_reason: str
    mps: str
    tenants: tuple[tuple[str, int, int | None, int | None], ...] = ()
    devices: tuple[GpuDeviceSample, ...] = ()


class GpuBackendCollector(Collector):
    """Reads the accelerator, per-tenant GPU bytes and NVML lazily, so no allocation updates a gauge."""

    def __init__(self) -> None:
        self.source: Callable[[], GpuBackendSample | None] = lambda: None

    def collect(self) -> Iterator[Metric]:
        s = self.source()
        if s is None:
            return
        info = GaugeMetricFamily(
            "tensorwasm_accelerator_info",
            "Accelerator in use (value 1): backend, the mode asked for, device, and why auto fell back.",
            labels=["backend", "requested", "device", "fallback_reason"],
        )
        info.add_metric([s.backend, s.requested, s.device, s.fallback_reason], 1.0)
        healthy = GaugeMetricFamily(
            "tensorwasm_accelerator_healthy", "0 once a sticky CUDA error poisoned the context, else 1."
        )
        healthy.add_metric([], 1.0 if s.healthy else 0.0)
        mps_info = GaugeMetricFamily(
            "tensorwasm_mps_info", "MPS state (value 1): off, client or daemon.", labels=["mode"]
        )
        mps_info.add_metric([s.mps], 1.0)
        used = GaugeMetricFamily(
            "tensorwasm_tenant_gpu_memory_bytes",
            "GPU bytes reserved by the tenant, counted at the pool's granularity.",
            labels=["tenant"],
        )
        cap = GaugeMetricFamily(
            "tensorwasm_tenant_gpu_memory_limit_bytes",
            "The tenant's GPU memory cap (absent: accounting only).",
            labels=["tenant"],
        )
        reserved = GaugeMetricFamily(
            "tensorwasm_tenant_gpu_pool_reserved_bytes",
            "Device memory the tenant's CUDA pool holds mapped, as the driver reports it.",
            labels=["tenant"],
        )
        for tenant, in_use, limit, pool in s.tenants:
            used.add_metric([tenant], float(in_use))
            if limit is not None:
                cap.add_metric([tenant], float(limit))
            if pool is not None:
                reserved.add_metric([tenant], float(pool))
        yield from (info, healthy, mps_info, used, cap, reserved)
        if not s.devices:
            return  # no GPU / no NVML: no device metrics at all
        total = GaugeMetricFamily(
            "tensorwasm_gpu_memory_total_bytes", "Device memory (NVML).", labels=["gpu", "name"]
        )
        dev_used = GaugeMetricFamily(
            "tensorwasm_gpu_memory_used_bytes", "Device memory in use (NVML).", labels=["gpu"]
        )
        util = GaugeMetricFamily(
            "tensorwasm_gpu_utilization_ratio", "GPU busy fraction, 0..1 (NVML).", labels=["gpu"]
        )
        temp = GaugeMetricFamily(
            "tensorwasm_gpu_temperature_celsius", "GPU temperature (NVML).", labels=["gpu"]
        )
        for d in s.devices:
            gpu = str(d.index)
            total.add_metric([gpu, d.name], float(d.memory_total_bytes))
            dev_used.add_metric([gpu], float(d.memory_used_bytes))
            util.add_metric([gpu], d.utilization_ratio)
            temp.add_metric([gpu], d.temperature_celsius)
        yield from (total, dev_used, util, temp)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked collector: nothing is collected at registration


GPU_BACKEND = GpuBackendCollector()
REGISTRY.register(GPU_BACKEND)

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
SNAPSHOT_HOT_TIER_LOOKUPS = Counter(
    "tensorwasm_snapshot_hot_tier_lookups_total",
    "Restores that looked in the pinned hot tier, by result: hit, miss, corrupt (entry refused, dropped).",
    ["result"],
    registry=REGISTRY,
)
SNAPSHOT_HOT_TIER_EVICTIONS = Counter(
    "tensorwasm_snapshot_hot_tier_evictions_total",
    "Hot-tier entries evicted (least recently used first) to make room.",
    registry=REGISTRY,
)
SNAPSHOT_HOT_TIER_BYTES = Gauge(
    "tensorwasm_snapshot_hot_tier_bytes",
    "Bytes of the pinned hot tier: used (held by entries) and capacity.",
    ["kind"],
    registry=REGISTRY,
)

# --- idle tenants: sleep and wake (runtime/sleep.py, tenancy/idle.py) ---

_WAKE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TENANT_SLEEPS = Counter(
    "tensorwasm_tenant_sleeps_total",
    "Tenants put to sleep in a snapshot, by reason: idle (spec.idle.after passed), evicted "
    "(room for a wake) or refused (its spec or Secret was refused: its state kept).",
    ["reason"],
    registry=REGISTRY,
)
TENANT_SLEEP_FAILURES = Counter(
    "tensorwasm_tenant_sleep_failures_total",
    "Sleep captures that failed (disk full, store error), by reason (idle or evicted): the tenant "
    "stays awake and is not tried again for a backoff (5 s doubling to 5 min while it keeps failing).",
    ["reason"],
    registry=REGISTRY,
)
TENANT_WAKES = Counter(
    "tensorwasm_tenant_wakes_total",
    "Sleeping tenants woken by a request, by source: hot (pinned hot tier), file, module (no usable "
    "snapshot) or failed (the restore was refused: the waiting requests failed, the tenant restarted "
    "from its module).",
    ["source"],
    registry=REGISTRY,
)
TENANT_WAKE_SECONDS = Histogram(
    "tensorwasm_tenant_wake_seconds",
    "Time from a request finding its tenant asleep to the tenant serving (room, open, restore).",
    buckets=_WAKE_BUCKETS,
    registry=REGISTRY,
)
TENANTS_ASLEEP = Gauge(
    "tensorwasm_tenants_asleep",
    "Tenants of this shard asleep in a snapshot (no instances, no GPU memory).",
    registry=REGISTRY,
)
RESIDENT_GPU_BYTES = Gauge(
    "tensorwasm_resident_gpu_bytes",
    "GPU bytes reserved by awake tenants (their caps) and the shard's resident budget (0: none).",
    ["kind"],
    registry=REGISTRY,
)
SLEEP_SNAPSHOTS = Gauge(
    "tensorwasm_sleep_snapshots",
    "Sleep snapshots in this shard's store by the key id that signed them ('unsigned' for none) and "
    "whether this shard's key ring still verifies them (false: the tenant restarts from its module "
    "at its next wake, losing its state; list the key again, or wait for 0 before removing a key).",
    ["key_id", "verifiable"],
    registry=REGISTRY,
)
SLEEP_SNAPSHOTS_SWEPT = Counter(
    "tensorwasm_sleep_snapshots_swept_total",
    "Sleep snapshots (record and blobs) removed because no Tenant owns their uid any more.",
    registry=REGISTRY,
)
TENANT_PREWARMS = Counter(
    "tensorwasm_tenant_prewarms_total",
    "Sleeping tenants woken ahead of predicted use (spec.idle.prewarm), by outcome: woken (a prewarm "
    "wake), hit (a request came while it was prewarmed) or miss (it slept again, or was evicted, "
    "unused).",
    ["outcome"],
    registry=REGISTRY,
)

# --- async jobs, rate limits, audit log (issue 14: api/jobs.py, tenancy/ratelimit.py, audit.py) ---


class JobsCollector(Collector):
    """tensorwasm_jobs{tenant,state}: async jobs held now, by state (read from the job board)."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[tuple[str, str, int]]] = lambda: ()

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "tensorwasm_jobs",
            "Async jobs held by the shard, by tenant and state (queued, running, done states).",
            labels=["tenant", "state"],
        )
        for tenant, state, n in self.source():
            jobs.add_metric([tenant, state], n)
        yield jobs

    def describe(self) -> Iterator[Metric]:
        return iter(())


JOBS = JobsCollector()
REGISTRY.register(JOBS)
RATE_LIMITED = Counter(
    "tensorwasm_rate_limited",
    "Invokes refused with 429 rate_limited because the tenant's spec.rateLimit bucket was empty.",
    ["tenant"],
    registry=REGISTRY,
)
AUDIT_RECORDS_WRITTEN = Counter(
    "tensorwasm_audit_records_written",
    "Audit log records written (one per invocation or admin action).",
    registry=REGISTRY,
)
AUDIT_RECORDS_DROPPED = Counter(
    "tensorwasm_audit_records_dropped",
    "Audit log records dropped: the writer was a full queue behind, or the write failed.",
    registry=REGISTRY,
)
