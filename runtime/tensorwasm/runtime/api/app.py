"""The shard's HTTP API (aiohttp): routes, auth, body limits and the JSON error envelope.

Owns `build_app` and every handler. HTTP <-> domain only: a handler resolves the tenant from the
bearer token (one dict lookup, see Shard.by_auth), checks the function and the body size, submits
the blocking invoke to the tenant's queue (its worker threads; never the event loop), and renders
either the guest's output bytes or `RuntimeFault.to_json()` with the fault's status (plus
Retry-After on 429). Bodies are raw bytes both ways; a request sent as application/json gets its
answer labelled application/json (the bytes are the guest's either way). Must not import wasmtime or cuda.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tensorwasm.runtime import metrics
from tensorwasm.runtime.errors import (
    AcceleratorFailed,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    RuntimeFault,
    TenantNotReady,
    Unauthenticated,
)
from tensorwasm.runtime.shard import ServedTenant, Shard
from tensorwasm.runtime.tenancy.queue import retry_after_header

log = logging.getLogger(__name__)

SHARD_KEY = web.AppKey("shard", Shard)
# aiohttp's own cap; per-tenant limits are enforced before reading (see _read_body).
CLIENT_MAX_SIZE = 1 << 30
OCTET = "application/octet-stream"
_OCTET_HEADERS = {"Content-Type": OCTET}  # copied by Response; cheaper than content_type= parsing
_JSON_HEADERS = {"Content-Type": "application/json"}  # JSON in, JSON out: the guest speaks it
_UNKNOWN_FUNCTION = "<unknown>"  # metric label for names a tenant does not export (bounded cardinality)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def fault_response(exc: RuntimeFault) -> web.Response:
    """The one error envelope: {"error": {"kind", "message", ...details}} with the fault's status."""
    headers = None
    if isinstance(exc, QueueFull):
        headers = {"Retry-After": retry_after_header(float(exc.details.get("retry_after_s", 1.0)))}
    elif isinstance(exc, Unauthenticated):
        headers = {"WWW-Authenticate": 'Bearer realm="tensorwasm"'}
    return web.json_response(exc.to_json(), status=exc.status, headers=headers)


# (method, path, handler name, status codes it can answer): the router is built from this table and
# tests/unit/test_api_openapi.py holds docs/openapi.yaml to it.
INVOKE_STATUSES = (200, 400, 401, 404, 413, 429, 500, 503, 504, 507)
ROUTES: tuple[tuple[str, str, str, tuple[int, ...]], ...] = (
    ("POST", "/v1/functions/{function}/invoke", "invoke", INVOKE_STATUSES),
    ("POST", "/v1/tenants/{tenant}/functions/{function}/invoke", "invoke_as", (*INVOKE_STATUSES, 403)),
    ("GET", "/v1/functions", "list_functions", (200, 401, 503)),
    ("GET", "/healthz", "healthz", (200,)),
    ("GET", "/readyz", "readyz", (200, 503)),
    ("GET", "/metrics", "metrics", (200,)),
)


def build_app(shard: Shard) -> web.Application:
    """The aiohttp application serving `shard`."""
    app = web.Application(client_max_size=CLIENT_MAX_SIZE, middlewares=[_envelope])
    app[SHARD_KEY] = shard
    api = _Api(shard)
    for method, path, handler, _ in ROUTES:
        app.router.add_route(method, path, getattr(api, handler))
    return app


class _Api:
    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    # --- invoke (hot path) ---

    async def invoke(self, request: web.Request) -> web.StreamResponse:
        tenant = self.shard.by_auth.get(request.headers.get("Authorization", ""))
        if tenant is None:
            return self._no_tenant(request)
        return await self._invoke(request, tenant, request.match_info["function"])

    async def invoke_as(self, request: web.Request) -> web.StreamResponse:
        tenant = self.shard.by_auth.get(request.headers.get("Authorization", ""))
        if tenant is None:
            return self._no_tenant(request)
        if tenant.name != request.match_info["tenant"]:
            # Same answer whether or not the other tenant exists: tokens do not probe the shard.
            return fault_response(
                Forbidden(f"this token does not belong to tenant {request.match_info['tenant']}")
            )
        return await self._invoke(request, tenant, request.match_info["function"])

    async def _invoke(self, request: web.Request, tenant: ServedTenant, function: str) -> web.StreamResponse:
        if function not in tenant.functions:
            tenant.record(_UNKNOWN_FUNCTION, NotFound.kind, None)
            return fault_response(
                NotFound(
                    f"tenant {tenant.name} has no function {function!r}", functions=sorted(tenant.functions)
                )
            )
        try:
            body = await _read_body(request, tenant.max_body_bytes)
            fut = tenant.queue.submit(tenant.invoke, function, body)
        except RuntimeFault as exc:  # refused before running: 413 or 429
            tenant.record(function, exc.kind, None)
            return fault_response(exc)
        start = perf_counter()
        try:
            output = await fut
        except RuntimeFault as exc:
            tenant.record(function, exc.kind, perf_counter() - start)
            if isinstance(exc, AcceleratorFailed):
                self.shard.health_poke.set()
            return fault_response(exc)
        except Exception as exc:  # a bug, not the guest's fault: say so without leaking internals
            log.exception("Failed invoke tenant=%s function=%s", tenant.name, function)
            tenant.record(function, RuntimeFault.kind, perf_counter() - start)
            return fault_response(RuntimeFault(f"internal error ({type(exc).__name__})"))
        tenant.record(function, "ok", perf_counter() - start)
        json_in = request.headers.get("Content-Type", "").startswith("application/json")
        return web.Response(body=output, headers=_JSON_HEADERS if json_in else _OCTET_HEADERS)

    def _no_tenant(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization")
        if not header:
            return fault_response(Unauthenticated("missing Authorization: Bearer <token> header"))
        waiting = self.shard.waiting_auth.get(header)
        if waiting is not None:
            status = self.shard.statuses.get(waiting)
            reason = status.reason if status else "Unknown"
            return fault_response(
                TenantNotReady(f"tenant {waiting} is not serving ({reason})", tenant=waiting, reason=reason)
            )
        if not header.startswith("Bearer "):
            return fault_response(Unauthenticated("the Authorization header must be 'Bearer <token>'"))
        return fault_response(Unauthenticated("unknown token"))

    # --- the rest ---

    async def list_functions(self, request: web.Request) -> web.StreamResponse:
        tenant = self.shard.by_auth.get(request.headers.get("Authorization", ""))
        if tenant is None:
            return self._no_tenant(request)
        limits = tenant.config.limits
        return web.json_response(
            {
                "tenant": tenant.name,
                "functions": sorted(tenant.functions),
                "limits": {
                    "linearMemoryBytes": limits.linear_memory_bytes,
                    "gpuMemoryBytes": limits.gpu_memory_bytes,
                    "timeoutMs": limits.timeout_ms,
                    "maxConcurrency": limits.max_concurrency,
                    "queueLength": limits.queue_length,
                    "maxBodyBytes": limits.max_body_bytes,
                },
            }
        )

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        ready, detail = self.shard.readiness()
        return web.json_response(detail, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        # Collected on the loop thread: the tenant-load collector reads loop-owned counters.
        body = generate_latest(metrics.REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing anything over `limit` before buffering it."""
    length = request.content_length
    if length is not None:
        if length > limit:
            raise PayloadTooLarge(f"body of {length} bytes is over the {limit}-byte limit", limit=limit)
        return await request.read() if length else b""
    chunks, total = [], 0  # chunked transfer: count as it arrives
    async for chunk in request.content.iter_any():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"body is over the {limit}-byte limit", limit=limit)
        chunks.append(chunk)
    return b"".join(chunks)


_HTTP_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


@web.middleware
async def _envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (unknown route, wrong method, oversized body) in our envelope too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = _HTTP_KINDS.get(exc.status, "http_error")
        body: dict[str, Any] = {"error": {"kind": kind, "message": exc.reason}}
        headers = {k: v for k, v in exc.headers.items() if k == "Allow"}
        return web.Response(
            text=json.dumps(body), status=exc.status, content_type="application/json", headers=headers
        )
