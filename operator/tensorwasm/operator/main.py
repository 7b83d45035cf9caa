"""Entry point of `tensorwasm operator`: kopf run programmatically with this operator's registry.

Owns process-level wiring: logging, the health server, leader election around kopf, standalone
vs peering. Must not hold reconcile logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any

import aiohttp
import kopf

from tensorwasm.api.logs import configure_logging
from tensorwasm.kube.client import KubeApi, KubeError, resource_path
from tensorwasm.operator import health
from tensorwasm.operator.desired.shards import build_owner_reference
from tensorwasm.operator.handlers import build_registry
from tensorwasm.operator.leader import LeaderElector
from tensorwasm.operator.preflight import StartupError, connection
from tensorwasm.operator.settings import FIELD_MANAGER, OperatorSettings

log = logging.getLogger("tensorwasm.operator")
EXIT_LOST_LEASE = 1


def run(
    settings: OperatorSettings,
    *,
    ready_flag: threading.Event | None = None,
    stop_flag: threading.Event | None = None,
) -> None:
    """Run until stopped (SIGINT/SIGTERM or `stop_flag`); one namespace, standalone or peered."""
    configure_logging(settings.log_level, settings.log_format)
    # kopf's per-event chatter stays at WARNING unless we debug.
    logging.getLogger("kopf").setLevel("DEBUG" if settings.log_level == "DEBUG" else "WARNING")
    logging.getLogger("aiohttp").setLevel("WARNING")
    try:
        asyncio.run(_main(settings, ready_flag, stop_flag))
    except StartupError as exc:  # the leader Lease is forbidden to us: one line, no retry loop
        print(f"tensorwasm operator: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


async def _main(
    settings: OperatorSettings, ready_flag: threading.Event | None, stop_flag: threading.Event | None
) -> None:
    server = await health.start_server(settings.health_port) if settings.health_port else None
    health.READINESS.api_reached = True  # the CLI's preflight reached it before we got here
    elector: LeaderElector | None = None
    try:
        if settings.leader_election_lease:
            api = KubeApi(connection(), FIELD_MANAGER)  # its own client: Lease writes are not reconciles
            elector = LeaderElector(
                api,
                settings.namespace,
                settings.leader_election_lease,
                settings.identity,
                settings.lease_duration_s,
                settings.renew_deadline_s,
                settings.lease_retry_s,
                owner=await _owner(api, settings),
            )
            if not await _campaign(elector):
                return
            health.LEADER_TRANSITIONS.inc()
        health.LEADER.set(1)
        health.READINESS.role = "leader"
        operator = asyncio.create_task(_kopf(settings, ready_flag, stop_flag))
        if elector is None:
            await operator
            return
        holding = asyncio.create_task(elector.hold())
        await asyncio.wait({operator, holding}, return_when=asyncio.FIRST_COMPLETED)
        if holding.done() and not operator.done():
            # Another replica may take over once the lease expires: stop every write now, the way
            # client-go's elector does (exit; the kubelet restarts us as a standby).
            logging.shutdown()
            os._exit(EXIT_LOST_LEASE)
        holding.cancel()
        await operator
    finally:
        health.LEADER.set(0)
        if elector is not None:
            await elector.release()
            await elector.api.close()
        if server is not None:
            await server.cleanup()


async def _owner(api: KubeApi, settings: OperatorSettings) -> dict[str, Any] | None:
    """The operator's own Deployment as an owner reference (None outside the chart or unreadable)."""
    if not settings.owner_deployment:
        return None
    path = resource_path("apps/v1", "deployments", settings.namespace, settings.owner_deployment)
    try:
        deployment = await api.get(path)
    except (KubeError, aiohttp.ClientError, TimeoutError) as exc:
        log.warning("Failed to read Deployment %s for the Lease's owner: %s", settings.owner_deployment, exc)
        return None
    return build_owner_reference(deployment) if deployment else None


async def _campaign(elector: LeaderElector) -> bool:
    """Wait as a standby until this replica leads (True) or SIGTERM/SIGINT arrives (False)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def standby() -> None:
        health.READINESS.role = "standby"

    health.READINESS.lease_fresh = elector.fresh
    acquire = asyncio.create_task(elector.acquire(standby))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({acquire, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)  # kopf installs its own once it runs
        stopping.cancel()
        if not acquire.done():
            acquire.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acquire
    if not acquire.done() or acquire.cancelled():
        log.info("Stopped as standby Lease %s/%s", elector.namespace, elector.name)
        return False
    acquire.result()  # StartupError: the Lease is forbidden to this replica
    return True


async def _kopf(
    settings: OperatorSettings, ready_flag: threading.Event | None, stop_flag: threading.Event | None
) -> None:
    await kopf.operator(
        registry=build_registry(settings),
        standalone=settings.standalone,
        # Naming a peering makes it mandatory in kopf: only when we really peer.
        peering_name=None if settings.standalone else settings.peering_name,
        namespaces=[settings.namespace],
        # kopf answers GET /healthz with 200 while its watchers and the event loop are alive
        # (and 500 when a @kopf.on.probe fails).
        liveness_endpoint=settings.liveness_endpoint,
        memo=kopf.Memo(),
        ready_flag=ready_flag,
        stop_flag=stop_flag,
    )
