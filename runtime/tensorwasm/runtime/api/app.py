"""The shard's HTTP API (aiohttp): routes, auth, body limits and the JSON error envelope.

Owns `build_app` and every handler. Issue 14 adds the invoke modes (`?mode=async`: 202 and a job,
api/jobs.py; `?mode=stream`: Server-Sent Events fed by the guest's stream_write, api/streams.py),
the token scopes (invoke or read, several tokens per tenant), the tenant's request rate limit
(tenancy/ratelimit.py) and one audit record per invocation and job action (audit.py).
HTTP <-> domain only: a handler resolves the tenant from the
bearer token (one dict lookup, see Shard.by_auth), checks the function and the body size, submits
the blocking invoke to the tenant's queue (its worker threads; never the event loop), and renders
either the guest's output bytes or `RuntimeFault.to_json()` with the fault's status (plus
Retry-After on 429). Bodies are raw bytes both ways; a request sent as application/json gets its
answer labelled application/json (the bytes are the guest's either way). Must not import wasmtime or cuda.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tensorwasm.runtime import metrics
from tensorwasm.runtime.api.admission import AdmissionLimits, AuthFailures, BodyBudget
from tensorwasm.runtime.api.guard import ConnectionLimits
from tensorwasm.runtime.api.jobs import (
    CANCELLED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    JobBoard,
    JobBody,
    JobLimits,
    JobOutput,
    run_job,
)
from tensorwasm.runtime.api.streams import SSE_CONTENT_TYPE, StreamBuffer, StreamLimits, sse_chunk, sse_json
from tensorwasm.runtime.audit import AuditLog
from tensorwasm.runtime.errors import (
    AcceleratorFailed,
    BadRequest,
    Cancelled,
    Forbidden,
    GuestLimitExceeded,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    QueueFull,
    RateLimited,
    RequestTimeout,
    RuntimeFault,
    TenantMoving,
    TenantNotReady,
    Unauthenticated,
)
from tensorwasm.runtime.shard import ServedTenant, Shard
from tensorwasm.runtime.tenancy.config import SCOPE_INVOKE, SCOPE_READ, TOKEN_KEY
from tensorwasm.runtime.tenancy.queue import retry_after_header
from tensorwasm.runtime.tenancy.ratelimit import RequestRates
from tensorwasm.runtime.tenancy.runs import GuestRun

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
MODES = ("sync", "async", "stream")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")  # a caller's X-Request-Id, kept as given
# GET /v1/jobs/{job}: an output at least this big is base64-encoded on a worker thread, never on the
# event loop (16 MiB took ~0.5 s there: every tenant of the shard stalled), a slice at a time, and at
# most BIG_JOB_READS slices are encoded at once shard-wide (the CPU part only: a client that reads
# slowly, or not at all, holds no slot while its bytes wait to be sent).
INLINE_OUTPUT_BYTES = 64 << 10
BIG_JOB_READS = 2
# A tenant's big job views being sent at once (each holds one encoded slice, 2 MiB at most, until
# the client takes it); the next is 429 overloaded with Retry-After (the raw /output route holds no
# encoding and is not counted).
BIG_VIEWS_PER_TENANT = 4

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
# ?mode=async answers 202 with a job; a read-only token is 403 on the invoke routes.
INVOKE_ROUTE_STATUSES = (*INVOKE_STATUSES, 202, 403)
READ_STATUSES = (200, 401, 429, 503)
ROUTES: tuple[tuple[str, str, str, tuple[int, ...]], ...] = (
    ("POST", "/v1/functions/{function}/invoke", "invoke", INVOKE_ROUTE_STATUSES),
    ("POST", "/v1/tenants/{tenant}/functions/{function}/invoke", "invoke_as", INVOKE_ROUTE_STATUSES),
    ("GET", "/v1/functions", "list_functions", READ_STATUSES),
    ("GET", "/v1/jobs", "list_jobs", READ_STATUSES),
    ("GET", "/v1/jobs/{job}", "get_job", (*READ_STATUSES, 404)),
    ("GET", "/v1/jobs/{job}/output", "get_job_output", (*READ_STATUSES, 404)),
    ("DELETE", "/v1/jobs/{job}", "cancel_job", (*READ_STATUSES, 403, 404)),
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
    jobs: JobLimits | None = None,
    streams: StreamLimits | None = None,
    audit: AuditLog | None = None,
) -> web.Application:
    """The tenant-facing application serving `shard`; `include_admin` adds the admin routes too
    (in-process tests, which have one listener). `audit` None: no audit records (its owner starts
    and closes it)."""
    app = web.Application(client_max_size=CLIENT_MAX_SIZE, middlewares=[_envelope])
    app[SHARD_KEY] = shard
    api = _Api(shard, admission or AdmissionLimits(), connections or ConnectionLimits(), jobs, streams, audit)
    metrics.JOBS.source = api.jobs.report
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
    def __init__(
        self,
        shard: Shard,
        admission: AdmissionLimits,
        connections: ConnectionLimits,
        jobs: JobLimits | None = None,
        streams: StreamLimits | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.shard = shard
        self.jobs = JobBoard(jobs)
        shard.on_hold.append(self.jobs.refuse_queued)  # a move barrier waits for no queued job
        self.jobs.on_tick = self._forget_departed  # the board's tick: tenants that left lose their tables
        self.stream_limits = streams or StreamLimits()
        self.rates = RequestRates()
        self.audit = audit
        self._request_ids = itertools.count(1)  # the audit writer spells them <boot id>-<n>
        # "Bearer <token>" -> (tenant, scope, Secret key) for every token but the primary ones
        # (those are shard.by_auth's: the hot path's one lookup); rebuilt when by_auth is replaced.
        self._extra: dict[str, tuple[ServedTenant, str, str]] = {}
        self._extra_for: dict[str, ServedTenant] | None = None
        self.body_budget = BodyBudget(admission.inflight_body_bytes)
        self.auth_failures = AuthFailures(
            admission.auth_failures_per_s, admission.auth_failure_burst, admission.tracked_sources
        )
        self.body_timeout_s = connections.body_timeout_s
        self._big_reads = asyncio.Semaphore(BIG_JOB_READS)
        self._big_views: dict[str, int] = {}  # tenant -> big job views being sent (no entry at 0)
        self._pruned_for: dict[str, ServedTenant] | None = None  # shard.by_auth when last pruned

    # --- invoke (hot path) ---

    async def invoke(self, request: web.Request) -> web.StreamResponse:
        tenant = self.shard.by_auth.get(request.headers.get("Authorization", ""))
        if tenant is None:
            found = self._other_token(request, SCOPE_INVOKE)
            if isinstance(found, web.StreamResponse):
                return found
            tenant, key = found
            return await self._invoke(request, tenant, request.match_info["function"], key)
        return await self._invoke(request, tenant, request.match_info["function"], TOKEN_KEY)

    async def invoke_as(self, request: web.Request) -> web.StreamResponse:
        tenant = self.shard.by_auth.get(request.headers.get("Authorization", ""))
        key = TOKEN_KEY
        if tenant is None:
            found = self._other_token(request, SCOPE_INVOKE, request.match_info["tenant"])
            if isinstance(found, web.StreamResponse):
                return found
            tenant, key = found
        if tenant.name != request.match_info["tenant"]:
            # Same answer whether or not the other tenant exists: tokens do not probe the shard.
            # Audited under the token's own tenant: probing another tenant's route is worth a record.
            forbidden = Forbidden(f"this token does not belong to tenant {request.match_info['tenant']}")
            self._audit(
                request, "invoke", tenant.name, key, _UNKNOWN_FUNCTION, _mode_of(request), 403,
                forbidden.kind, None, 0,
            )  # fmt: skip
            return fault_response(forbidden)
        return await self._invoke(request, tenant, request.match_info["function"], key)

    async def _invoke(
        self, request: web.Request, tenant: ServedTenant, function: str, key: str
    ) -> web.StreamResponse:
        mode = "sync"
        if request.query_string:  # the common case has none: no query parsing on the hot path
            mode = request.query.get("mode", "sync")
            if mode not in MODES:
                bad = BadRequest(
                    f"mode must be one of {', '.join(MODES)}, got {mode[:64]!r}", modes=list(MODES)
                )
                return self._refused(request, tenant, _UNKNOWN_FUNCTION, bad, key, "sync")
        if function not in tenant.functions:
            missing = NotFound(
                f"tenant {tenant.name} has no function {function!r}", functions=sorted(tenant.functions)
            )
            return self._refused(request, tenant, _UNKNOWN_FUNCTION, missing, key, mode)
        # Admission before a byte of the body is read: the tenant's request rate (429), size (413),
        # async job table (429), the tenant's queue (429), the shard's in-flight body budget (429).
        # A refused body is never read: the connection closes.
        rate = tenant.config.rate_limit
        if rate.requests_per_second is not None:
            self._forget_departed()
            wait = self.rates.take(tenant.name, rate)
            if wait:
                metrics.RATE_LIMITED.labels(tenant=tenant.name).inc()
                limited = RateLimited(
                    f"tenant {tenant.name} is over its rate limit of {rate.requests_per_second} requests/s",
                    retry_after_s=round(wait, 3),
                    requests_per_second=rate.requests_per_second,
                    burst=rate.burst if rate.burst is not None else rate.requests_per_second,
                )
                return self._refused(request, tenant, function, limited, key, mode)
        limit = tenant.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            return self._refused(request, tenant, function, PayloadTooLarge(
                f"body of {length} bytes is over the {limit}-byte limit", limit=limit
            ), key, mode)  # fmt: skip
        if mode == "async":
            try:
                self.jobs.admit(tenant.name)
            except RuntimeFault as exc:
                return self._refused(request, tenant, function, exc, key, mode)
        queue = tenant.queue
        try:
            queue.reserve()
        except RuntimeFault as exc:
            return self._refused(request, tenant, function, exc, key, mode)
        charge = limit if length is None else length  # chunked: the most it may be
        if not self.body_budget.take(charge):
            queue.unreserve()
            return self._refused(request, tenant, function, Overloaded(
                "the shard has too many request bytes in flight", retry_after_s=1.0
            ), key, mode)  # fmt: skip
        submitted = False
        deferred = False  # an async job gives its body's charge back when it ends
        start = perf_counter()
        nbytes = 0
        try:
            try:
                content = request.content
                if length is not None and content.is_eof():
                    # The whole body came in with the headers (every small invoke): take the bytes as
                    # they lie; no timer to arm, no read coroutine (request.read() loops on readany
                    # and copies through a bytearray). Its length is the header's (the parser's check).
                    body = content.read_nowait()
                else:
                    async with asyncio.timeout(self.body_timeout_s):
                        body = await _read_body(request, length, limit)
            except TimeoutError:
                return self._refused(request, tenant, function, RequestTimeout(
                    f"the request body did not arrive within {self.body_timeout_s} s"
                ), key, mode)  # fmt: skip
            except RuntimeFault as exc:
                return self._refused(request, tenant, function, exc, key, mode)
            start = perf_counter()
            nbytes = len(body)
            if nbytes < charge:  # chunked: the worst case only covered the upload; the rest goes back now
                self.body_budget.give(charge - nbytes)
                charge = nbytes
            if mode == "async":  # again: jobs admitted meanwhile, while this body was arriving
                self.jobs.admit(tenant.name)
                if tenant.name in self.shard.holds:  # a move barrier began while it arrived
                    return self._refused(request, tenant, function, TenantMoving(
                        f"tenant {tenant.name} is moving to another shard", tenant=tenant.name,
                        retry_after_s=MOVING_RETRY_AFTER_S,
                    ), key, mode)  # fmt: skip
            submitted = True  # from here the queue owns the slot (submit gives it back if closed)
            if mode == "async":
                deferred = True  # from here _start_job (or the job's body) gives the charge back
                return self._start_job(request, tenant, function, key, body, charge)
            if mode != "sync":
                return await self._stream(request, tenant, function, key, body)
            fut = queue.submit(tenant.invoke, function, body, reserved=True)
            del body  # the job holds it until the guest has copied it in
            output = await fut
        except RuntimeFault as exc:
            took = perf_counter() - start
            tenant.record(function, exc.kind, took)
            if isinstance(exc, AcceleratorFailed):
                self.shard.health_poke.set()
            self._audit(
                request, "invoke", tenant.name, key, function, mode, exc.status, exc.kind, took, nbytes
            )
            return fault_response(exc)
        except Exception as exc:  # a bug, not the guest's fault: say so without leaking internals
            log.exception("Failed invoke tenant=%s function=%s", tenant.name, function)
            took = perf_counter() - start
            tenant.record(function, RuntimeFault.kind, took)
            self._audit(
                request, "invoke", tenant.name, key, function, mode, 500, RuntimeFault.kind, took, nbytes
            )
            return fault_response(RuntimeFault(f"internal error ({type(exc).__name__})"))
        finally:
            # Every exit (refusal, error, client gone mid-body) gives back what admission took.
            if not submitted:
                queue.unreserve()
            if not deferred:
                self.body_budget.give(charge)
        took = perf_counter() - start
        tenant.record(function, "ok", took)
        if self.audit is not None:
            self._audit(
                request, "invoke", tenant.name, key, function, mode, 200, "ok", took, nbytes, len(output)
            )
        json_in = request.headers.get("Content-Type", "").startswith("application/json")
        return web.Response(body=output, headers=_JSON_HEADERS if json_in else _OCTET_HEADERS)

    def _start_job(
        self,
        request: web.Request,
        tenant: ServedTenant,
        function: str,
        key: str,
        body: bytes,
        charge: int,
    ) -> web.StreamResponse:
        """?mode=async: the invoke goes to the tenant's queue as a job; 202 with its id at once.
        The body's share (`charge`) of the in-flight body budget is given back when the body
        leaves memory (jobs.JobBody: a cancel while queued drops it; else its run's end), not at
        the 202."""
        sink = JobOutput(tenant.config.limits.max_output_bytes)
        run = GuestRun(sink)
        held = JobBody(body, lambda: self.body_budget.give(charge), asyncio.get_running_loop())
        try:
            fut = tenant.queue.submit(run_job, (run, tenant.invoke, function), held, reserved=True)
        except BaseException:
            self.body_budget.give(charge)  # never queued: nothing else will
            raise
        fut.add_done_callback(lambda _f: held.drop())  # cancelled while queued: the body goes now
        self._forget_departed()
        job = self.jobs.create(tenant.name, function, run, sink, len(body), fut)
        started = perf_counter()

        def done(f: asyncio.Future[Any]) -> None:
            # Runs after the board's _finish (registered later): the job's state is the verdict,
            # which may differ from the future's (an output over the tenant's jobOutputBytes, a
            # job failed tenant_moving at a move barrier: its future was cancelled).
            took = perf_counter() - started
            outcome, out = _job_outcome(job, f)
            status = 200 if outcome == "ok" else _STATUS_OF_KIND.get(outcome, RuntimeFault.status)
            tenant.record(function, outcome, took)
            self._audit(
                request,
                "job",
                tenant.name,
                key,
                function,
                "async",
                status,
                outcome,
                took,
                job.bytes_in,
                out,
                job.id,
            )

        fut.add_done_callback(done)
        self._audit(
            request,
            "invoke",
            tenant.name,
            key,
            function,
            "async",
            202,
            "accepted",
            None,
            job.bytes_in,
            0,
            job.id,
        )
        return web.json_response(job.view(), status=202, headers={"Location": f"/v1/jobs/{job.id}"})

    async def _stream(
        self, request: web.Request, tenant: ServedTenant, function: str, key: str, body: bytes
    ) -> web.StreamResponse:
        """?mode=stream: Server-Sent Events, one per chunk the guest writes, then `done` or `error`.

        Until the first chunk nothing is sent, so a run that fails before streaming gets the usual
        status and envelope; after it, a failure is an `error` event carrying the envelope.
        """
        buf = StreamBuffer(
            asyncio.get_running_loop(), self.stream_limits, tenant.config.limits.max_output_bytes
        )
        stall_s = self.stream_limits.stall_s
        run = GuestRun(buf)
        fut = tenant.queue.submit(run.call, (tenant.invoke, function), body, reserved=True)
        fut.add_done_callback(_retrieve)  # a client that left never reads the outcome
        nbytes = len(body)
        del body
        start = perf_counter()
        resp: web.StreamResponse | None = None
        chunks = sent = 0
        outcome, status = "ok", 200
        over: GuestLimitExceeded | None = None
        try:
            while True:
                waiter = asyncio.ensure_future(buf.ready())
                try:
                    await asyncio.wait((waiter, fut), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                pieces = buf.take()
                if fut.done() and not fut.cancelled() and fut.exception() is None and (last := fut.result()):
                    # The return value is the stream's last chunk, and counts against the same
                    # maxOutputBytes as the streamed ones (the worker is done with buf: total is final).
                    if buf.total + len(last) > buf.max_total:
                        over = GuestLimitExceeded(
                            f"the stream and its return value passed the tenant's {buf.max_total}-byte "
                            "output limit",
                            limit="maxOutputBytes",
                            value=buf.max_total,
                        )
                    else:
                        pieces.append(last)
                for piece in pieces:
                    if resp is None:
                        resp = await _start_sse(request)
                    try:  # a client that reads nothing for stall_s loses the stream (and the guest stops)
                        async with asyncio.timeout(stall_s):
                            await resp.write(sse_chunk(piece))
                    except TimeoutError:
                        stalled = GuestLimitExceeded(
                            f"the client read no stream output for {stall_s:g} s",
                            limit="streamStallSeconds",
                            value=stall_s,
                        )
                        buf.close(stalled)
                        if request.transport is not None:
                            request.transport.abort()
                        raise stalled from None
                    chunks, sent = chunks + 1, sent + len(piece)
                if over is not None:  # what was streamed went out; then the error event
                    raise over
                if fut.done():
                    break
            fut.result()  # raises the guest's fault
            if resp is None:
                resp = await _start_sse(request)
            await resp.write(sse_json("done", {"chunks": chunks, "bytes": sent}))
            await resp.write_eof()
        except RuntimeFault as exc:
            outcome, status = exc.kind, exc.status
            if isinstance(exc, AcceleratorFailed):
                self.shard.health_poke.set()
            if resp is None:
                return fault_response(exc)
            if exc.details.get("limit") != "streamStallSeconds":  # a stalled client gets no more bytes
                with contextlib.suppress(ConnectionError):
                    await resp.write(sse_json("error", exc.to_json()))
                    await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError) as exc:
            # The client went away: the guest is stopped at its next stream_write (or its deadline).
            outcome, status = "cancelled", 499
            run.cancel("the streaming client went away")
            fut.cancel()
            if isinstance(exc, asyncio.CancelledError) or resp is None:
                raise
            return resp
        except Exception as exc:  # a bug, not the guest's fault: say so without leaking internals
            log.exception("Failed stream tenant=%s function=%s", tenant.name, function)
            internal = RuntimeFault(f"internal error ({type(exc).__name__})")
            outcome, status = internal.kind, 500
            if resp is None:
                return fault_response(internal)
            with contextlib.suppress(ConnectionError):
                await resp.write(sse_json("error", internal.to_json()))
        finally:
            buf.close()
            took = perf_counter() - start
            tenant.record(function, outcome, took)
            self._audit(
                request, "invoke", tenant.name, key, function, "stream", status, outcome, took, nbytes, sent
            )
        return resp

    def _forget_departed(self) -> None:
        """Drop the job tables and rate buckets of tenants that left this shard: neither served,
        nor assigned (a module change unloads the old version and serves nothing while the new one
        opens: its jobs stay, review R3 K4), nor held for a move. The shard replaces by_auth
        whenever its served or assigned set changes (every sync), so one identity test says whether
        to look."""
        by_auth = self.shard.by_auth
        if by_auth is not self._pruned_for:
            shard = self.shard
            here = set(shard.served) | set(shard.assigned) | set(shard.holds)
            self.jobs.forget_except(here)
            self.rates.forget_except(here)
            self._pruned_for = by_auth

    def _refused(
        self,
        request: web.Request,
        tenant: ServedTenant,
        function: str,
        exc: RuntimeFault,
        key: str = TOKEN_KEY,
        mode: str = "sync",
    ) -> web.Response:
        """Refused before running: counted, and the connection closed if the body was not read.
        Audited per (tenant, kind) at most once a second with a count (audit.RefusalWindows): a
        flood of refusals must not rotate the other tenants' records out of the log."""
        tenant.record(function, exc.kind, None)
        self._audit(request, "invoke", tenant.name, key, function, mode, exc.status, exc.kind, None, 0,
                    refused=True)  # fmt: skip
        return _closing(fault_response(exc))

    def _other_token(
        self, request: web.Request, need: str, tenant_name: str | None = None
    ) -> tuple[ServedTenant, str] | web.StreamResponse:
        """A token that is not a tenant's primary one: another key of its Secret (rotation), or a
        read-only token. The primary tokens never get here (shard.by_auth)."""
        by_auth = self.shard.by_auth
        if by_auth is not self._extra_for:
            extra: dict[str, tuple[ServedTenant, str, str]] = {}
            for t in self.shard.served.values():
                for k, token, scope in t.config.extra_tokens:
                    header = f"Bearer {token}"
                    if header not in by_auth:  # a primary token always means its own tenant
                        extra[header] = (t, scope, k)
            self._extra, self._extra_for = extra, by_auth
        found = self._extra.get(request.headers.get("Authorization", ""))
        if found is None:
            return self._no_tenant(request)
        tenant, scope, key = found
        if tenant.name in self.shard.holds:
            moving = TenantMoving(f"tenant {tenant.name} is moving to another shard", tenant=tenant.name,
                                  retry_after_s=MOVING_RETRY_AFTER_S)  # fmt: skip
            return _closing(fault_response(moving))
        if (
            need == SCOPE_INVOKE
            and scope == SCOPE_READ
            and (tenant_name is None or tenant_name == tenant.name)
        ):
            forbidden = Forbidden(
                f"token {key} of tenant {tenant.name} is read-only: it lists functions and reads jobs",
                scope=scope,
            )
            self._audit(
                request, "invoke", tenant.name, key, _UNKNOWN_FUNCTION, _mode_of(request), 403,
                forbidden.kind, None, 0,
            )  # fmt: skip
            return _closing(fault_response(forbidden))
        return tenant, key

    def _reader(self, request: web.Request) -> tuple[ServedTenant, str] | web.StreamResponse:
        """The tenant of a token of either scope."""
        tenant = self.shard.by_auth.get(request.headers.get("Authorization", ""))
        if tenant is not None:
            return tenant, TOKEN_KEY
        return self._other_token(request, SCOPE_READ)

    def _audit(
        self,
        request: web.Request,
        action: str,
        tenant: str,
        key: str,
        function: str,
        mode: str,
        status: int,
        outcome: str,
        seconds: float | None,
        bytes_in: int,
        bytes_out: int = 0,
        job: str = "",
        refused: bool = False,
    ) -> None:
        if self.audit is None:
            return
        rid: str | int | None = request.headers.get("X-Request-Id")
        if rid is None or not _REQUEST_ID.match(rid):  # type: ignore[arg-type]
            rid = next(self._request_ids)
        (self.audit.refusal if refused else self.audit.record)((
            time.time(), action, rid, tenant, key, function, mode, status, outcome, seconds, bytes_in,
            bytes_out, request.remote or "", job,
        ))  # fmt: skip

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
        found = self._reader(request)
        if isinstance(found, web.StreamResponse):
            return found
        tenant = found[0]
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

    # --- async jobs (read: either scope; cancel: invoke scope) ---

    async def list_jobs(self, request: web.Request) -> web.StreamResponse:
        found = self._reader(request)
        if isinstance(found, web.StreamResponse):
            return found
        jobs = self.jobs.list(found[0].name)
        return web.json_response({"jobs": [job.view(with_output=False) for job in jobs]})

    def _readable_job(self, request: web.Request) -> Job | web.StreamResponse:
        """The job the URL names, for a token that may read it; else the refusal to send."""
        found = self._reader(request)
        if isinstance(found, web.StreamResponse):
            return found
        try:
            return self.jobs.get(found[0].name, request.match_info["job"])
        except RuntimeFault as exc:
            return fault_response(exc)

    async def get_job(self, request: web.Request) -> web.StreamResponse:
        job = self._readable_job(request)
        if isinstance(job, web.StreamResponse):
            return job
        output = job.output
        if output is None or len(output) < INLINE_OUTPUT_BYTES:
            return web.json_response(job.view())
        return await self._big_job_view(request, job, output)

    async def get_job_output(self, request: web.Request) -> web.StreamResponse:
        """A succeeded job's output as the raw bytes (no base64, no JSON); 404 while it has none."""
        job = self._readable_job(request)
        if isinstance(job, web.StreamResponse):
            return job
        output = job.output
        if output is None:
            state = job.current_state()
            return fault_response(NotFound(
                f"job {job.id} has no output (state {state}); GET /v1/jobs/{job.id} says why", state=state
            ))  # fmt: skip
        resp = web.StreamResponse(headers=_OCTET_HEADERS)
        resp.content_length = len(output)
        with self.jobs.reading(job):  # forgotten meanwhile: still charged to the tenant until sent
            await resp.prepare(request)
            view = memoryview(output)
            # The last bytes go as a copy: what the transport may still buffer once the handler
            # has returned (below its high-water mark) must not be a view keeping the output alive.
            tail = max(0, len(view) - _COPIED_TAIL)
            for at in range(0, tail, _WRITE_BYTES):  # each piece drains: the loop copies little
                if not await self._send(request, resp, job, view[at : min(at + _WRITE_BYTES, tail)]):
                    return resp
            if not await self._send(request, resp, job, bytes(view[tail:])):
                return resp
            await resp.write_eof()
        return resp

    async def _big_job_view(self, request: web.Request, job: Job, output: bytes) -> web.StreamResponse:
        """The same JSON as job.view(), its base64 output encoded on a worker thread a slice at a
        time (at most BIG_JOB_READS slices at once shard-wide) and written as it lies: no JSON
        encoding of the big string on the loop; one slice's encoding held per read, and at most
        BIG_VIEWS_PER_TENANT of a tenant's reads at once (else 429), so clients that do not read
        hold a bounded amount of memory and only their own tenant's slots."""
        sending = self._big_views.get(job.tenant, 0)
        if sending >= BIG_VIEWS_PER_TENANT:
            return fault_response(Overloaded(
                f"tenant {job.tenant} has {sending} big job views being sent (at most "
                f"{BIG_VIEWS_PER_TENANT}); GET /v1/jobs/{job.id}/output answers the raw bytes",
                retry_after_s=1.0,
            ))  # fmt: skip
        self._big_views[job.tenant] = sending + 1
        try:
            return await self._send_big_view(request, job, output)
        finally:
            if (left := self._big_views[job.tenant] - 1) > 0:
                self._big_views[job.tenant] = left
            else:
                del self._big_views[job.tenant]

    async def _send_big_view(self, request: web.Request, job: Job, output: bytes) -> web.StreamResponse:
        head = json.dumps(job.view(with_output=False))[:-1].encode()  # without its closing brace
        resp = web.StreamResponse(headers=_JSON_HEADERS)
        encoded = 4 * -(-len(output) // 3)  # base64 of the whole: slices are multiples of 3 bytes
        resp.content_length = len(head) + len(_OUTPUT_KEY) + encoded + len(_OUTPUT_END)
        with self.jobs.reading(job):  # forgotten meanwhile: still charged to the tenant until sent
            await resp.prepare(request)
            if not await self._send(request, resp, job, head + _OUTPUT_KEY):
                return resp
            view = memoryview(output)
            for at in range(0, len(view), _ENCODE_SLICE):
                async with self._big_reads:  # the CPU part only, never a write to a slow client
                    pieces = await asyncio.to_thread(_encode_output, view[at : at + _ENCODE_SLICE])
                for piece in pieces:  # each write drains: the loop copies little at a time
                    if not await self._send(request, resp, job, piece):
                        return resp
                del pieces
            if not await self._send(request, resp, job, _OUTPUT_END):
                return resp
            await resp.write_eof()
        return resp

    async def _send(
        self, request: web.Request, resp: web.StreamResponse, job: Job, data: bytes | memoryview
    ) -> bool:
        """One piece of a job read; False when the client went away, or took none of it for
        read_stall_s: its connection is then aborted (the handler returns; nothing more is sent)."""
        stall_s = self.jobs.limits.read_stall_s
        try:
            async with asyncio.timeout(stall_s):
                await resp.write(data)
        except ConnectionError:
            return False
        except TimeoutError:
            log.info("Closed a stalled job read tenant=%s job=%s stall_s=%g", job.tenant, job.id, stall_s)
            if request.transport is not None:
                request.transport.abort()
            return False
        return True

    async def cancel_job(self, request: web.Request) -> web.StreamResponse:
        """DELETE: cancel a queued or running job (it stays, cancelled, until it expires), or
        forget a finished one now."""
        tenant = self.shard.by_auth.get(request.headers.get("Authorization", ""))
        key = TOKEN_KEY
        if tenant is None:
            found = self._other_token(request, SCOPE_INVOKE)
            if isinstance(found, web.StreamResponse):
                return found
            tenant, key = found
        job_id = request.match_info["job"]
        try:
            job = self.jobs.cancel(tenant.name, job_id)
        except RuntimeFault as exc:
            self._audit(request, "cancel", tenant.name, key, "", "async", exc.status, exc.kind, None, 0)
            return fault_response(exc)
        self._audit(
            request, "cancel", tenant.name, key, job.function, "async", 200, job.state, None, 0, 0, job.id
        )
        return web.json_response(job.view(with_output=False))

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


_OUTPUT_KEY, _OUTPUT_END = b', "output": "', b'"}'
_WRITE_BYTES = 1 << 20  # a big job view goes to the socket in pieces of this size


_ENCODE_PIECE = 3 * (32 << 10)  # 96 KiB of output -> 128 KiB of base64 (a multiple of 3: no padding)
_ENCODE_SLICE = 16 * _ENCODE_PIECE  # encoded per thread hop: 1.5 MiB -> 2 MiB held per big read
# The raw output route sends its last bytes as a copy: more than the transport's high-water mark
# (64 KiB, asyncio's and uvloop's), so no view of the output is left in its buffer.
_COPIED_TAIL = 256 << 10
# Every fault's HTTP status by kind: a job's audit record says what its state says.
_STATUS_OF_KIND: dict[str, int] = {}
_faults: list[type[RuntimeFault]] = [RuntimeFault]
while _faults:
    _fault = _faults.pop()
    _STATUS_OF_KIND.setdefault(_fault.kind, _fault.status)
    _faults.extend(_fault.__subclasses__())


def _job_outcome(job: Job, fut: asyncio.Future[Any]) -> tuple[str, int]:
    """(outcome kind or "ok", output bytes) of an ended job for its audit record: the job's state
    once the board has settled it; the future's verdict only if the board let the job go (its
    tenant left the shard)."""
    if job.state == SUCCEEDED:
        return "ok", len(job.output or b"")
    if job.state == CANCELLED:
        return Cancelled.kind, 0
    if job.state not in (QUEUED, RUNNING):
        return str((job.error or {}).get("kind", RuntimeFault.kind)), 0
    if fut.cancelled():
        return Cancelled.kind, 0
    if (exc := fut.exception()) is not None:
        return (exc.kind if isinstance(exc, RuntimeFault) else RuntimeFault.kind), 0
    return "ok", len(fut.result())


def _encode_output(output: bytes | memoryview) -> list[bytes]:
    """A job's output as base64, in pieces that concatenate to the whole (called on a worker
    thread). In pieces because b64encode holds the GIL for its whole call: one 16 MiB call kept the
    event loop thread off the GIL for ~0.1 s; a piece takes about a millisecond, and the
    interpreter hands the GIL over between pieces."""
    view = memoryview(output)
    return [base64.b64encode(view[at : at + _ENCODE_PIECE]) for at in range(0, len(view), _ENCODE_PIECE)]


def _mode_of(request: web.Request) -> str:
    """The request's ?mode= for an audit record of a refusal before it was checked ("sync" when
    absent or not one of MODES: audit fields come from a closed alphabet)."""
    if not request.query_string:
        return "sync"
    mode = request.query.get("mode", "sync")
    return mode if mode in MODES else "sync"


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # marks it retrieved: no "exception was never retrieved" noise


async def _start_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=200,
        # no-transform/X-Accel-Buffering: proxies must pass each event on as it comes
        headers={
            "Content-Type": SSE_CONTENT_TYPE,
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",
        },
    )
    await resp.prepare(request)
    return resp


def _closing(response: web.Response) -> web.Response:
    # aiohttp would otherwise read (and drop) an unread body to keep the connection: not ours to read.
    response.force_close()
    return response


async def _read_body(request: web.Request, length: int | None, limit: int) -> bytes:
    """The request body (`length`: its Content-Length), refusing anything over `limit` before buffering it."""
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
