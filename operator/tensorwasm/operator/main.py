"""Entry point of `tensorwasm operator`: kopf run programmatically with this operator's registry.

Owns process-level wiring (logging, the event loop, standalone vs peering). Must not hold logic.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import kopf

from tensorwasm.operator.handlers import build_registry
from tensorwasm.operator.settings import OperatorSettings


def run(
    settings: OperatorSettings,
    *,
    ready_flag: threading.Event | None = None,
    stop_flag: threading.Event | None = None,
) -> None:
    """Run until stopped (SIGINT/SIGTERM or `stop_flag`); one namespace, standalone or peered."""
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True
    )
    # kopf's per-event chatter stays at WARNING unless we debug.
    logging.getLogger("kopf").setLevel("DEBUG" if settings.log_level == "DEBUG" else "WARNING")
    logging.getLogger("aiohttp").setLevel("WARNING")
    asyncio.run(
        kopf.operator(
            registry=build_registry(settings),
            standalone=settings.standalone,
            # Naming a peering makes it mandatory in kopf: only when we really peer.
            peering_name=None if settings.standalone else settings.peering_name,
            namespaces=[settings.namespace],
            # kopf answers GET /healthz with 200 while its watchers and the event loop are alive
            # (and 500 when a @kopf.on.probe fails): the chart's livenessProbe points here.
            liveness_endpoint=settings.liveness_endpoint,
            memo=kopf.Memo(),
            ready_flag=ready_flag,
            stop_flag=stop_flag,
        )
    )
