"""The shard's HTTP API (aiohttp): routes, auth, body limits and the JSON error envelope.

Owns `build_app` and every handler. HTTP <-> domain only: a handler resolves the tenant from the
bearer token (one dict lookup, see Shard.by_auth), checks the function and the body size, submits
the blocking invoke to the tenant's queue (its worker threads; never the event loop), and renders
either the guest's output bytes or `RuntimeFault.to_json()` with the fault's status (plus
Retry-After on 429). Bodies are raw bytes both ways; a request sent as application/json gets its
answer labelled application/json (the bytes are the guest's either way). Must not import wasmtime or cuda.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tensorwasm.runtime import metrics
from tensorwasm.runtime.api.admission import AdmissionLimits, AuthFailures, BodyBudget
from tensorwasm.runtime.api.guard import ConnectionLimits
from tensorwasm.runtime.errors import (
    AcceleratorFailed,
    Forbidden,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    QueueFull,
    RequestTimeout,
    RuntimeFault,
    TenantMoving,
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
# Retry-After of the 503s (whole seconds on the wire): a move barrier lasts about one capture.
MOVING_RETRY_AFTER_S = NOT_READY_RETRY_AFTER_S = 1.0
_UNKNOWN_FUNCTION = "<unknown>"  # metric label for names a tenant does not export (bounded cardinality)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def fault_response(exc: RuntimeFault) -> web.Response:
    """The one error envelope: {"error": {"kind", "message", ...details}} with the fault's status."""
    headers = None
    if isinstance(exc, QueueFull) or "retry_after_s" in exc.details:  # 429s, and 503s that pass
        headers = {"Retry-After": retry_after_header(float(exc.details.get("retry_after_s", 1.0)))}
    elif isinstance(exc, Unauthenticated):
        headers = {"WWW-Authenticate": 'Bearer realm="tensorwasm"'}
    return web.json_response(exc.to_json(), status=exc.status, headers=headers)


# (method, path, handler name, status codes it can answer): the router is built from this table and
# tests/unit/test_api_openapi.py holds docs/openapi.yaml to it.
INVOKE_STATUSES = (200, 400, 401, 404, 408, 413, 429, 500, 503, 504, 507)
ROUTES: tuple[tuple[str, str, str, tuple[int, ...]], ...] = (
    ("POST", "/v1/functions/{function}/invoke", "invoke", INVOKE_STATUSES),
    ("POST", "/v1/tenants/{tenant}/functions/{function}/invoke", "invoke_as", (*INVOKE_STATUSES, 403)),
    ("GET", "/v1/functions", "list_functions", (200, 401, 429, 503)),
    ("GET", "/healthz", "healthz", (200,)),
    ("GET", "/readyz", "ready", (200, 503)),
)
# The admin listener (--admin-listen): readiness detail (tenant names) and metrics, unauthenticated,
# so never on the port tenants reach.
ADMIN_ROUTES: tuple[tuple[str, str, str, tuple[int, ...]], ...] = (
    ("GET", "/healthz", "healthz", (200,)),
    ("GET", "/readyz", "readyz", (200, 503)),
    ("GET", "/metrics", "metrics", (200,)),
)


def build_app(
    shard: Shard,
    admission: AdmissionLimits | None = None,
    connections: ConnectionLimits | None = None,
    include_admin: bool = False,
) -> web.Application:
    """The tenant-facing application serving `shard`; `include_admin` adds the admin routes too
    (in-process tests, which have one listener)."""
    app = web.Application(client_max_size=CLIENT_MAX_SIZE, middlewares=[_envelope])
    app[SHARD_KEY] = shard
    api = _Api(shard, admission or AdmissionLimits(), connections or ConnectionLimits())
    routes = ROUTES if not include_admin else (*ROUTES[:-1], *ADMIN_ROUTES[1:])
    for method, path, handler, _ in routes:
        app.router.add_route(method, path, getattr(api, handler))
    return app


def build_admin_app(shard: Shard) -> web.Application:
    """The admin application: /healthz, /readyz with every tenant's state, /metrics."""
    app = web.Application(middlewares=[_envelope])
    app[SHARD_KEY] = shard
    api = _Api(shard, AdmissionLimits(), ConnectionLimits())
    for method, path, handler, _ in ADMIN_ROUTES:
        app.router.add_route(method, path, getattr(api, handler))
    return app


class _Api:
    def __init__(self, shard: Shard, admission: AdmissionLimits, connections: ConnectionLimits) -> None:
        self.shard = shard
        self.body_budget = BodyBudget(admission.inflight_body_bytes)
        self.auth_failures = AuthFailures(
            admission.auth_failures_per_s, admission.auth_failure_burst, admission.tracked_sources
        )
        self.body_timeout_s = connections.body_timeout_s

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
            missing = NotFound(
                f"tenant {tenant.name} has no function {function!r}", functions=sorted(tenant.functions)
            )
            return _closing(fault_response(missing))
        # Admission before a byte of the body is read: size (413), the tenant's queue (429), the
        # shard's in-flight body budget (429). A refused body is never read: the connection closes.
        limit = tenant.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            return self._refused(tenant, function, PayloadTooLarge(
                f"body of {length} bytes is over the {limit}-byte limit", limit=limit
            ))  # fmt: skip
        queue = tenant.queue
        try:
            queue.reserve()
        except RuntimeFault as exc:
            return self._refused(tenant, function, exc)
        charge = limit if length is None else length  # chunked: the most it may be
        if not self.body_budget.take(charge):
            queue.unreserve()
            return self._refused(tenant, function, Overloaded(
                "the shard has too many request bytes in flight", retry_after_s=1.0
            ))  # fmt: skip
        submitted = False
        start = perf_counter()
        try:
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    body = await _read_body(request, limit)
            except TimeoutError:
                return self._refused(tenant, function, RequestTimeout(
                    f"the request body did not arrive within {self.body_timeout_s} s"
                ))  # fmt: skip
            except RuntimeFault as exc:
                return self._refused(tenant, function, exc)
            start = perf_counter()
            submitted = True  # from here the queue owns the slot (submit gives it back if closed)
            fut = queue.submit(tenant.invoke, function, body, reserved=True)
            del body  # the job holds it until the guest has copied it in
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
        finally:
            # Every exit (refusal, error, client gone mid-body) gives back what admission took.
            if not submitted:
                queue.unreserve()
            self.body_budget.give(charge)
        tenant.record(function, "ok", perf_counter() - start)
        json_in = request.headers.get("Content-Type", "").startswith("application/json")
        return web.Response(body=output, headers=_JSON_HEADERS if json_in else _OCTET_HEADERS)

    def _refused(self, tenant: ServedTenant, function: str, exc: RuntimeFault) -> web.Response:
        """Refused before running: counted, and the connection closed if the body was not read."""
        tenant.record(function, exc.kind, None)
        return _closing(fault_response(exc))

    def _no_tenant(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization")
        source = request.remote or "?"
        wait = self.auth_failures.blocked(source)
        if wait:
            # Too many failures from this address: not even looked up, so a token cannot be guessed.
            return _closing(fault_response(Overloaded(
                "too many failed authentications from this address", retry_after_s=round(wait, 3)
            )))  # fmt: skip
        if header:
            held = self.shard.held_auth.get(header)
            if held is not None:  # at a move barrier: closing makes the client's retry reconnect
                moving = TenantMoving(f"tenant {held} is moving to another shard", tenant=held,
                                      retry_after_s=MOVING_RETRY_AFTER_S)  # fmt: skip
                return _closing(fault_response(moving))
            waiting = self.shard.waiting_auth.get(header)
            if waiting is not None:
                status = self.shard.statuses.get(waiting)
                reason = status.reason if status else "Unknown"
                not_ready = TenantNotReady(
                    f"tenant {waiting} is not serving ({reason})", tenant=waiting, reason=reason,
                    retry_after_s=NOT_READY_RETRY_AFTER_S,
                )  # fmt: skip
                return _closing(fault_response(not_ready))
        self.auth_failures.failed(source)
        if not header:
            return _closing(fault_response(Unauthenticated("missing Authorization: Bearer <token> header")))
        if not header.startswith("Bearer "):
            return _closing(
                fault_response(Unauthenticated("the Authorization header must be 'Bearer <token>'"))
            )
        return _closing(fault_response(Unauthenticated("unknown token")))

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

    async def ready(self, request: web.Request) -> web.StreamResponse:
        """Readiness for the tenant port (probes): the verdict only, no tenant names."""
        ready, _ = self.shard.readiness()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        ready, detail = self.shard.readiness()
        return web.json_response(detail, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        # Collected on the loop thread: the tenant-load collector reads loop-owned counters.
        body = generate_latest(metrics.REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _closing(response: web.Response) -> web.Response:
    # aiohttp would otherwise read (and drop) an unread body to keep the connection: not ours to read.
    response.force_close()
    return response


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
