"""The operator's own HTTP endpoints: /healthz, /readyz and /metrics on one port (HEALTH_PORT).

Owns the operator's Prometheus metrics (every one defined here) and the readiness state. It runs
on every replica from the start, before leader election, so a standby answers its probes too.
/healthz: the event loop answers. /readyz: 200 once the API server was reached and either this
replica leads and its first listing is done, or it stands by and has read the Lease within a lease
duration (a rollout must not wait for a standby to lead; a standby that cannot see the Lease could
never take over). Must not import kopf or the Reconciler (they report here).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger("tensorwasm.operator")

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
RECONCILES = Counter(
    "tensorwasm_operator_reconciles_total",
    "Tenant reconciles by result: ok, or error (a failed API call, retried with backoff).",
    ["result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "tensorwasm_operator_reconcile_duration_seconds",
    "Time one Tenant reconcile took, waiting for its lock excluded.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
QUEUE = Gauge(
    "tensorwasm_operator_reconcile_queue_depth",
    "Tenant reconciles waiting or running (watch events and spawned retries).",
    registry=REGISTRY,
)
EVENTS = Counter(
    "tensorwasm_operator_events_total",
    "Events posted about Tenants, by type (Normal, Warning).",
    ["type"],
    registry=REGISTRY,
)
LEADER = Gauge(
    "tensorwasm_operator_leader",
    "1 while this replica holds the leader Lease (or runs without election), else 0.",
    registry=REGISTRY,
)
LEADER_TRANSITIONS = Counter(
    "tensorwasm_operator_leader_acquired_total",
    "Times this replica acquired the leader Lease.",
    registry=REGISTRY,
)


class Readiness:
    """What /readyz reports; set by the start-up path and the leader elector."""

    def __init__(self) -> None:
        self.api_reached = False
        self.role = "starting"  # starting, standby, leader
        self.listed = False  # the leader's Reconciler has listed everything
        self.lease_fresh: Callable[[], bool] = lambda: True  # the elector's: Lease read lately

    @property
    def ready(self) -> bool:
        standby = self.role == "standby" and self.lease_fresh()
        return self.api_reached and (standby or (self.role == "leader" and self.listed))

    def describe(self) -> str:
        lease = "" if self.role != "standby" or self.lease_fresh() else " lease=unread"
        return f"role={self.role} api={'ok' if self.api_reached else 'unreached'} listed={self.listed}{lease}"


READINESS = Readiness()


@contextmanager
def reconcile_timer() -> Iterator[list[str]]:
    """Times one reconcile; the caller sets result[0] to "error" on failure."""
    result = ["ok"]
    start = time.perf_counter()
    try:
        yield result
    finally:
        RECONCILE_SECONDS.observe(time.perf_counter() - start)
        RECONCILES.labels(result[0]).inc()


def build_app(readiness: Readiness = READINESS) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(status=200 if readiness.ready else 503, text=readiness.describe() + "\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_server(port: int, readiness: Readiness = READINESS) -> web.AppRunner:
    """Serve on 0.0.0.0:`port` (probes come from the kubelet, scrapes from Prometheus)."""
    runner = web.AppRunner(build_app(readiness), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    log.info("Serving health port=%d paths=/healthz,/readyz,/metrics", port)
    return runner
