"""Issue 14 on a real shard: async jobs, streamed output, token scopes and rotation, rate limits,
the audit log. Real wasm (tests/fixtures/streamer.wat, echo.wat, runaway.wat), the real engine,
queue and HTTP server on loopback; nothing here times anything: every wait is on observable state
with a generous deadline."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.api.tenant import RateLimit
from tensorwasm.runtime import metrics
from tensorwasm.runtime.accel import select_accelerator
from tensorwasm.runtime.api.app import build_app
from tensorwasm.runtime.api.jobs import JobBoard, JobLimits, JobOutput
from tensorwasm.runtime.api.server import serve
from tensorwasm.runtime.api.streams import StreamLimits
from tensorwasm.runtime.audit import AuditLog, AuditSettings, format_record
from tensorwasm.runtime.engine import Engine
from tensorwasm.runtime.modules import ModuleLoader
from tensorwasm.runtime.shard import Shard
from tensorwasm.runtime.tenancy.config import TenantConfig
from tensorwasm.runtime.tenancy.ratelimit import RequestRates
from tensorwasm.runtime.tenancy.runs import GuestRun
from tests.conftest import wait_for
from tests.runtime_fixtures import Reply, RuntimeServer, tenant

DEADLINE_S = 60.0


def _until(check: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
    """Poll `check` until it returns something truthy (state, not time, is what is asserted)."""
    return wait_for(check, deadline_s, what, interval=0.02)


@pytest.fixture
def shard_server() -> Iterator[Callable[..., RuntimeServer]]:
    """Factory: a real shard like tests/runtime_fixtures' with this issue's knobs (job and stream
    limits, an audit log) passed to build_app."""
    stops: list[Callable[[], None]] = []

    def make(configs: Sequence[TenantConfig], **app_kwargs: Any) -> RuntimeServer:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        accelerator = select_accelerator("cpu")
        engine = Engine(epoch_tick_s=0.001)
        box: list[Shard] = []

        async def start() -> tuple[Any, int]:
            shard = Shard(engine, accelerator, ModuleLoader(engine, 64 << 20, 10.0))
            box.append(shard)
            metrics.INVOKES.source = shard.invoke_report
            await shard.sync(list(configs))
            return await serve(build_app(shard, include_admin=True, **app_kwargs), "127.0.0.1", 0)

        listener, port = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
        server = RuntimeServer(port, box[0], loop)

        def stop() -> None:
            async def down() -> None:
                await listener.cleanup()
                await server.shard.close()

            asyncio.run_coroutine_threadsafe(down(), loop).result(60)
            metrics.INVOKES.source = lambda: ()
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
            engine.close()
            accelerator.close()

        stops.append(stop)
        return server

    yield make
    for stop in reversed(stops):
        stop()


def _job(server: RuntimeServer, cfg: TenantConfig, job_id: str, token: str | None = None) -> Reply:
    return server.request("GET", f"/v1/jobs/{job_id}", token=token or cfg.token)


def _finished(server: RuntimeServer, cfg: TenantConfig, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        view = _job(server, cfg, job_id).json()
        return view if view["state"] not in ("queued", "running") else None

    result: dict[str, Any] = _until(done, f"job {job_id} to finish")
    return result


def _events(body: bytes) -> list[tuple[str, str]]:
    """Server-Sent Events as (event, data) pairs, data lines joined by \\n as the spec says."""
    out = []
    for block in body.decode().split("\n\n"):
        if not block:
            continue
        event, data = "message", []
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
        out.append((event, "\n".join(data)))
    return out


def _metric(server: RuntimeServer, prefix: str) -> float:
    text = server.request("GET", "/metrics").body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


# --- async jobs ---


def test_async_job_runs_to_completion_and_only_its_tenant_can_see_it(shard_server) -> None:
    alpha, beta = tenant("alpha"), tenant("beta")
    server = shard_server([alpha, beta])
    r = server.request("POST", "/v1/functions/echo/invoke?mode=async", b"hello job", token=alpha.token)
    assert r.status == 202, r.body
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}" == job["location"]
    assert job["state"] in ("queued", "running", "succeeded") and job["inputBytes"] == 9
    view = _finished(server, alpha, job["id"])
    assert view["state"] == "succeeded", view
    assert base64.b64decode(view["output"]) == b"hello job" and view["outputBytes"] == 9
    assert "finishedAt" in view and "expiresAt" in view
    # Another tenant's token: 404, the same answer as an id that never existed.
    other = _job(server, alpha, job["id"], token=beta.token)
    unknown = _job(server, alpha, "job-000000000000000000000000")
    assert other.status == unknown.status == 404
    assert other.json()["error"]["kind"] == unknown.json()["error"]["kind"] == "not_found"
    assert server.request("DELETE", f"/v1/jobs/{job['id']}", token=beta.token).status == 404
    listed = server.request("GET", "/v1/jobs", token=alpha.token).json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]] and "output" not in listed[0]
    assert server.request("GET", "/v1/jobs", token=beta.token).json() == {"jobs": []}
    assert _metric(server, 'tensorwasm_jobs{state="succeeded",tenant="alpha"}') == 1
    # DELETE on a finished job forgets it.
    assert server.request("DELETE", f"/v1/jobs/{job['id']}", token=alpha.token).json()["state"] == "succeeded"
    assert _job(server, alpha, job["id"]).status == 404


def test_async_guest_failure_is_the_jobs_error_in_the_envelope(shard_server) -> None:
    cfg = tenant("spinner", "runaway.wat", timeout_ms=50)
    server = shard_server([cfg])
    r = server.request("POST", "/v1/functions/spin/invoke?mode=async", b"", token=cfg.token)
    view = _finished(server, cfg, r.json()["id"])
    assert view["state"] == "failed" and view["error"]["kind"] == "deadline_exceeded"
    assert "output" not in view


def test_job_table_is_bounded_per_tenant_and_neighbours_are_unaffected(shard_server) -> None:
    alpha, beta = tenant("alpha"), tenant("beta")
    server = shard_server([alpha, beta], jobs=JobLimits(per_tenant=2))
    ids = [
        server.request("POST", "/v1/functions/echo/invoke?mode=async", b"x", token=alpha.token).json()["id"]
        for _ in range(2)
    ]
    full = server.request("POST", "/v1/functions/echo/invoke?mode=async", b"x", token=alpha.token)
    assert full.status == 429 and full.json()["error"]["kind"] == "jobs_full"
    assert int(full.headers["retry-after"]) >= 1 and full.json()["error"]["max_jobs"] == 2
    # The neighbour's table is its own; sync invokes of the full tenant still run.
    assert (
        server.request("POST", "/v1/functions/echo/invoke?mode=async", b"y", token=beta.token).status == 202
    )
    assert server.invoke(alpha, "echo", b"sync").body == b"sync"
    # Forgetting a finished job makes room.
    _finished(server, alpha, ids[0])
    assert server.request("DELETE", f"/v1/jobs/{ids[0]}", token=alpha.token).status == 200
    again = server.request("POST", "/v1/functions/echo/invoke?mode=async", b"x", token=alpha.token)
    assert again.status == 202


def test_delete_stops_a_running_job_at_once_and_spares_its_neighbours(shard_server) -> None:
    # Ten-minute deadlines: the spinner (a loop that never calls the host) must be stopped by the
    # cancel itself; waiting for its deadline would fail every wait below.
    cfg = tenant("spinner", "runaway.wat", timeout_ms=600_000, max_concurrency=1)
    other = tenant("neighbour", "runaway.wat", timeout_ms=600_000, max_concurrency=2)
    server = shard_server([cfg, other])

    def post(who: TenantConfig, function: str) -> dict[str, Any]:
        reply = server.request("POST", f"/v1/functions/{function}/invoke?mode=async", b"", token=who.token)
        assert reply.status == 202, reply.body
        view: dict[str, Any] = reply.json()
        return view

    def state(who: TenantConfig, job: dict[str, Any]) -> str:
        return str(_job(server, who, job["id"]).json()["state"])

    theirs = post(other, "spin")
    _until(lambda: state(other, theirs) == "running", "the neighbour's spinner to start")
    running = post(cfg, "spin")
    _until(lambda: state(cfg, running) == "running", "the spinner to start")
    queued = post(cfg, "ok")
    assert state(cfg, queued) == "queued"
    gone = server.request("DELETE", f"/v1/jobs/{queued['id']}", token=cfg.token)
    assert gone.status == 200 and gone.json()["state"] == "cancelled"
    stop = server.request("DELETE", f"/v1/jobs/{running['id']}", token=cfg.token).json()
    assert stop["state"] == "cancelled" and stop["error"]["kind"] == "cancelled"
    # The tenant's one worker runs the next job: the spinner was stopped, not left to its deadline,
    # which the neighbour's spinner (started first, same deadline) shows by still running.
    after = post(cfg, "ok")
    assert _finished(server, cfg, after["id"])["state"] == "succeeded"
    assert state(other, theirs) == "running"
    assert server.invoke(other, "ok").status == 200  # the neighbour's second worker serves as before
    for job in (queued, running):
        view = _job(server, cfg, job["id"]).json()
        assert view["state"] == "cancelled" and "output" not in view
    assert _metric(server, 'tensorwasm_jobs{state="cancelled",tenant="spinner"}') == 2
    assert _metric(server, 'tensorwasm_jobs{state="cancelled",tenant="neighbour"}') == 0
    assert _outcomes(server, "spinner", "spin") == {"cancelled": 1}
    # The neighbour's spinner stops the same way when its own owner cancels it.
    assert server.request("DELETE", f"/v1/jobs/{theirs['id']}", token=other.token).status == 200
    done = [post(other, "ok") for _ in range(2)]  # both workers free again
    assert all(_finished(server, other, job["id"])["state"] == "succeeded" for job in done)


def test_job_board_forgets_finished_jobs_after_the_ttl_and_tells_when_full() -> None:
    now = [1000.0]
    board = JobBoard(JobLimits(per_tenant=1, ttl_s=60), clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        fut: asyncio.Future[Any] = loop.create_future()
        job = board.create("alpha", "echo", GuestRun(), JobOutput(1 << 20), 3, fut)
        fut.set_result(b"out")
        loop.run_until_complete(asyncio.sleep(0))  # done callbacks run on the loop
        assert board.get("alpha", job.id).state == "succeeded"
        with pytest.raises(Exception) as full:
            board.admit("alpha")
        assert full.value.details["retry_after_s"] == 60  # type: ignore[attr-defined]
        now[0] += 59.9
        assert board.get("alpha", job.id).output == b"out"
        now[0] += 0.2
        with pytest.raises(Exception, match="no job"):
            board.get("alpha", job.id)
        board.admit("alpha")  # room again
    finally:
        loop.close()


def test_job_output_budget_per_tenant_fails_the_job_clearly() -> None:
    board = JobBoard(JobLimits(output_bytes_per_tenant=10))
    loop = asyncio.new_event_loop()
    try:
        fut: asyncio.Future[Any] = loop.create_future()
        job = board.create("alpha", "echo", GuestRun(), JobOutput(1 << 20), 0, fut)
        fut.set_result(b"x" * 11)
        loop.run_until_complete(asyncio.sleep(0))
        assert job.state == "failed" and job.error is not None
        assert job.error["kind"] == "guest_limit_exceeded" and job.error["limit"] == "jobOutputBytes"
    finally:
        loop.close()


# --- streaming ---


def test_stream_sends_each_chunk_as_an_event_then_done(shard_server) -> None:
    cfg = tenant("streamer", "streamer.wat")
    server = shard_server([cfg])
    r = server.request(
        "POST", "/v1/functions/chunks/invoke?mode=stream", b"line one\nline two\n", token=cfg.token
    )
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.body)
    assert events[:4] == [("text", "line one\nline two\n")] * 3 + [("text", "end")]
    assert events[4][0] == "done" and json.loads(events[4][1]) == {"chunks": 4, "bytes": 3 * 18 + 3}
    # Bytes that are not UTF-8 (or hold a CR) arrive base64 in a `bytes` event, exactly.
    raw = bytes(range(256))
    events = _events(
        server.request("POST", "/v1/functions/chunks/invoke?mode=stream", raw, token=cfg.token).body
    )
    assert base64.b64decode(events[0][1]) == raw and events[0][0] == "bytes"


def test_stream_write_outside_a_stream_answers_no_stream_and_old_modules_are_unaffected(shard_server) -> None:
    cfg, echo = tenant("streamer", "streamer.wat"), tenant("echo")
    server = shard_server([cfg, echo])
    r = server.invoke(cfg, "probe", b"abc")
    assert r.status == 200 and int.from_bytes(r.body, "little", signed=True) == -8  # E_NO_STREAM
    assert server.invoke(echo, "echo", b"abc").body == b"abc"
    # A module without the import streams its return value as the one chunk.
    events = _events(
        server.request("POST", "/v1/functions/echo/invoke?mode=stream", b"abc", token=echo.token).body
    )
    assert events[0] == ("text", "abc") and events[1][0] == "done"


def test_an_oversize_stream_ends_with_an_error_event_and_a_failure_before_any_chunk_is_a_status(
    shard_server,
) -> None:
    cfg = tenant("streamer", "streamer.wat", max_output_bytes=64 << 10)
    spinner = tenant("spinner", "runaway.wat", timeout_ms=50)
    server = shard_server([cfg, spinner])
    r = server.request("POST", "/v1/functions/flood/invoke?mode=stream", b"z" * 4096, token=cfg.token)
    events = _events(r.body)
    assert r.status == 200 and events[-1][0] == "error"
    error = json.loads(events[-1][1])["error"]
    assert error["kind"] == "guest_limit_exceeded" and error["limit"] == "maxOutputBytes"
    streamed = sum(len(d) for e, d in events if e == "text")
    assert 0 < streamed <= 64 << 10
    # Nothing streamed yet: the usual status and envelope.
    r = server.request("POST", "/v1/functions/spin/invoke?mode=stream", b"", token=spinner.token)
    assert r.status == 504 and r.json()["error"]["kind"] == "deadline_exceeded"
    bad = server.request("POST", "/v1/functions/chunks/invoke?mode=sideways", b"", token=cfg.token)
    assert bad.status == 400 and bad.json()["error"]["modes"] == ["sync", "async", "stream"]


def _raw_stream(port: int, cfg: TenantConfig, function: str, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    head = (
        f"POST /v1/functions/{function}/invoke?mode=stream HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {cfg.token}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def _outcomes(server: RuntimeServer, name: str, function: str) -> dict[str, int]:
    stats = server.shard.stats.get(name, {}).get(function)
    return dict(stats.outcomes) if stats else {}


def test_a_slow_reader_stops_the_guest_clearly_and_frees_its_slot(shard_server) -> None:
    cfg = tenant("streamer", "streamer.wat", max_concurrency=1, max_output_bytes=1 << 30, timeout_ms=120_000)
    server = shard_server([cfg], streams=StreamLimits(buffer_bytes=64 << 10, stall_s=0.2))
    sock = _raw_stream(server.port, cfg, "flood", b"s" * 60_000)  # never read: the client stalls
    try:
        _until(
            lambda: _outcomes(server, "streamer", "flood").get("guest_limit_exceeded"),
            "the stalled guest to be stopped",
        )
        # Its worker is free again: the same tenant (one slot) serves the next request.
        assert server.invoke(cfg, "chunks", b"a").status == 200
    finally:
        sock.close()


def test_a_client_that_goes_away_cancels_the_guest(shard_server) -> None:
    cfg = tenant("streamer", "streamer.wat", max_concurrency=1, max_output_bytes=4 << 30, timeout_ms=600_000)
    server = shard_server([cfg])
    sock = _raw_stream(server.port, cfg, "flood", b"q" * 1000)
    got = bytearray()

    def first_event() -> bool:
        got.extend(sock.recv(65536))  # headers and events may come in separate segments
        return b"event: text" in got

    _until(first_event, "the first event")
    sock.close()
    _until(lambda: _outcomes(server, "streamer", "flood").get("cancelled"), "the guest to be cancelled")
    assert server.invoke(cfg, "chunks", b"a").status == 200  # its one slot is free


# --- tokens and rate limits ---


def test_several_tokens_rotate_without_downtime_and_read_tokens_cannot_invoke(shard_server) -> None:
    old, new, reader = "old-token-0123456789", "new-token-0123456789", "read-token-0123456789"
    cfg = replace(
        tenant("alpha", token=old),
        extra_tokens=(("token.next", new, "invoke"), ("read-token", reader, "read")),
    )
    server = shard_server([cfg])
    pool = server.shard.served["alpha"].pool
    for token in (old, new):
        assert server.request("POST", "/v1/functions/echo/invoke", b"hi", token=token).body == b"hi"
    assert server.request("GET", "/v1/functions", token=reader).json()["tenant"] == "alpha"
    assert server.request("GET", "/v1/jobs", token=reader).status == 200
    denied = server.request("POST", "/v1/functions/echo/invoke", b"hi", token=reader)
    assert denied.status == 403 and denied.json()["error"]["scope"] == "read"
    job = server.request("POST", "/v1/functions/echo/invoke?mode=async", b"j", token=new).json()
    assert server.request("GET", f"/v1/jobs/{job['id']}", token=reader).status == 200
    assert server.request("DELETE", f"/v1/jobs/{job['id']}", token=reader).status == 403
    # Rotation: the new token becomes the primary one, the old one is revoked; no reload.
    server.sync([replace(cfg, token=new, extra_tokens=(("read-token", reader, "read"),))])
    assert server.shard.served["alpha"].pool is pool
    revoked = server.request("POST", "/v1/functions/echo/invoke", b"hi", token=old)
    assert revoked.status == 401 and revoked.json()["error"]["kind"] == "unauthenticated"
    assert server.request("POST", "/v1/functions/echo/invoke", b"hi", token=new).status == 200
    # A tenant may not claim another tenant's token under any key.
    thief = replace(tenant("beta"), extra_tokens=(("token.x", new, "invoke"),))
    server.sync([replace(cfg, token=new, extra_tokens=()), thief])
    assert server.shard.statuses["beta"].reason == "TokenConflict"
    assert server.request("POST", "/v1/functions/echo/invoke", b"hi", token=new).status == 200


def test_burst_exhaustion_answers_429_with_retry_after_and_spares_neighbours(shard_server) -> None:
    limited = replace(tenant("alpha"), rate_limit=RateLimit(requests_per_second=1, burst=2))
    free = tenant("beta")
    server = shard_server([limited, free])
    refused = None
    for _ in range(50):  # the bucket holds 2 and refills 1/s: a refusal comes long before 50
        r = server.invoke(limited, "echo", b"x")
        if r.status == 429:
            refused = r
            break
        assert r.status == 200
    assert refused is not None
    error = refused.json()["error"]
    assert error["kind"] == "rate_limited" and error["requests_per_second"] == 1 and error["burst"] == 2
    assert 0 < error["retry_after_s"] <= 1 and refused.headers["retry-after"] == "1"
    assert server.invoke(free, "echo", b"x").status == 200
    assert _metric(server, 'tensorwasm_rate_limited_total{tenant="alpha"}') >= 1


def test_the_bucket_refills_at_the_rate_and_retry_after_says_when() -> None:
    now = [0.0]
    rates = RequestRates(clock=lambda: now[0])
    spec = RateLimit(requests_per_second=2, burst=3)
    assert [rates.take("a", spec) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rates.take("a", spec) == pytest.approx(0.5)
    now[0] += 0.25
    assert rates.take("a", spec) == pytest.approx(0.25)  # half a token back: half the wait
    now[0] += 0.25
    assert rates.take("a", spec) == 0.0
    assert rates.take("b", RateLimit()) == 0.0  # no spec.rateLimit: no limit
    assert rates.take("a", RateLimit(requests_per_second=2, burst=1)) == 0.0  # a new spec: a full bucket


# --- audit log ---


def test_audit_records_every_invocation_without_payloads_or_tokens(shard_server, tmp_path: Path) -> None:
    cfg = tenant("alpha")
    audit = AuditLog(AuditSettings(target=str(tmp_path / "audit.log"), flush_s=0.01)).start()
    try:
        server = shard_server([cfg], audit=audit)
        secret = b"top-secret-payload"
        assert server.invoke(cfg, "echo", secret, headers={"X-Request-Id": "req-42"}).status == 200
        assert server.invoke(cfg, "nope", b"").status == 404
        job = server.request("POST", "/v1/functions/echo/invoke?mode=async", secret, token=cfg.token).json()
        _finished(server, cfg, job["id"])
        assert (
            server.request("POST", "/v1/functions/echo/invoke", b"", token="wrong-token-000000").status == 401
        )

        def records() -> list[dict[str, Any]] | None:
            lines = (tmp_path / "audit.log").read_text().splitlines()
            return [json.loads(line) for line in lines] if len(lines) >= 4 else None

        recs = _until(records, "four audit records")
    finally:
        audit.close()
    text = (tmp_path / "audit.log").read_text()
    assert secret.decode() not in text and cfg.token not in text
    ok = recs[0]
    assert ok["requestId"] == "req-42" and ok["tenant"] == "alpha" and ok["tokenId"] == "token"
    assert (ok["function"], ok["status"], ok["outcome"], ok["bytesIn"], ok["bytesOut"]) == (
        "echo",
        200,
        "ok",
        18,
        18,
    )
    assert recs[1]["status"] == 404 and recs[1]["function"] == "<unknown>"
    assert {(r["action"], r["mode"], r["status"]) for r in recs[2:4]} == {
        ("invoke", "async", 202),
        ("job", "async", 200),
    }
    assert recs[2]["job"] == recs[3]["job"] == job["id"]
    assert audit.dropped == 0 and audit.written >= 4


def test_audit_queue_is_bounded_drops_are_counted_and_files_rotate(tmp_path: Path) -> None:
    rec = (
        time.time(),
        "invoke",
        "r-1",
        "alpha",
        "token",
        "echo",
        "sync",
        200,
        "ok",
        0.001,
        1,
        1,
        "127.0.0.1",
        "",
    )
    assert json.loads(format_record(rec))["durationMs"] == 1.0
    before = metrics.AUDIT_RECORDS_DROPPED._value.get()
    audit = AuditLog(AuditSettings(target=str(tmp_path / "a.log"), capacity=3, rotate_bytes=600, keep=2))
    for _ in range(5):  # the writer is not started: the queue fills
        audit.record(rec)
    assert audit.dropped == 2 and metrics.AUDIT_RECORDS_DROPPED._value.get() == before + 2
    audit.start()
    for _ in range(8):  # each batch is at most one rotation apart
        audit.record(rec)
        _until(lambda: not audit._queue, "the writer to drain")
    audit.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a.log", "a.log.1", "a.log.2"]  # keep=2: older ones deleted
    assert all(p.stat().st_size <= 600 for p in tmp_path.iterdir())


def test_audit_to_stdout_writes_json_lines() -> None:
    out = io.StringIO()
    audit = AuditLog(AuditSettings(flush_s=0.0), stream=out).start()
    audit.record(
        (
            time.time(),
            "cancel",
            'weird"id',
            "a",
            "token",
            "f",
            "async",
            200,
            "cancelled",
            None,
            0,
            0,
            "::1",
            "job-1",
        )
    )
    audit.close()
    line = json.loads(out.getvalue())
    assert line["requestId"] == 'weird"id' and line["durationMs"] is None and line["type"] == "audit"


def test_the_planner_models_the_audit_writer_as_it_batches() -> None:
    from tensorwasm.planner.model import AUDIT_WRITES_PER_S_PER_SHARD, audit_writes, default_workload

    assert 1 / AuditSettings().flush_s == AUDIT_WRITES_PER_S_PER_SHARD
    assert audit_writes(default_workload(10, 1000)).value == AUDIT_WRITES_PER_S_PER_SHARD
    assert audit_writes(default_workload(10, 5)).value == 5  # fewer requests than batches


def test_tenants_file_tokens_and_rate_limit_and_their_refusals(tmp_path: Path) -> None:
    from tensorwasm.api.fields import InvalidSpec
    from tensorwasm.runtime.tenancy.config import parse_local_tenant, token_key_scope

    (tmp_path / "ci.token").write_text("read-only-ci-token-01\n")
    base = {"name": "alpha", "token": "primary-token-0001", "module": {"path": "m.wat", "sha256": "0" * 64}}
    cfg = parse_local_tenant(
        {
            **base,
            "rateLimit": {"requestsPerSecond": 5},
            "tokens": [
                {"id": "next", "token": "next-token-00001"},
                {"id": "ci", "tokenFile": "ci.token", "scope": "read"},
            ],
        },
        "tenants[0]",
        tmp_path,
    )
    assert cfg.rate_limit == RateLimit(requests_per_second=5)
    assert cfg.all_tokens() == (
        ("token", "primary-token-0001", "invoke"),
        ("token.next", "next-token-00001", "invoke"),
        ("read-token.ci", "read-only-ci-token-01", "read"),
    )
    for bad, message in (
        ({"tokens": [{"id": "x", "token": "tok-000000001", "scope": "admin"}]}, "scope: must be one of"),
        (
            {"tokens": [{"id": "x", "token": "tok-000000001"}, {"id": "x", "token": "tok-000000002"}]},
            "used twice",
        ),
        ({"tokens": [{"id": "x", "token": "short"}]}, "at least 8 characters"),
        ({"tokens": [{"id": "no spaces", "token": "tok-000000001"}]}, "does not match"),
        ({"rateLimit": {"requestsPerSecond": 0}}, "requestsPerSecond"),
        ({"rateLimit": {"burst": 10, "perMinute": 3}}, "perMinute"),
    ):
        with pytest.raises(InvalidSpec, match=message):
            parse_local_tenant({**base, **bad}, "tenants[0]", tmp_path)
    # Secret keys: which grant what (a key that merely starts with "token" grants nothing).
    keys = ("token", "token.a", "read-token", "read-token.b", "tokens", "token.", "x")
    assert [token_key_scope(k) for k in keys] == ["invoke", "invoke", "read", "read", None, None, None]


def test_the_kube_source_reads_every_token_key_of_the_secret() -> None:
    from tensorwasm.runtime.sources.kube import ClusterView, _resolve_or_refuse

    obj = {
        "metadata": {"name": "alpha", "namespace": "ns", "generation": 1, "uid": "u1"},
        "spec": {
            "module": {"url": "https://example.com/m.wasm", "sha256": "0" * 64},
            "functions": ["echo"],
            "rateLimit": {"requestsPerSecond": 3, "burst": 6},
        },
    }
    secret = {
        "token": b"primary-0001\n",
        "token.next": b"next-0002",
        "read-token": b"reader-0003",
        "read-token.ci": b"  ",  # empty: ignored, not a token that matches an empty header
        "notes": b"not a token",
    }
    cfg = _resolve_or_refuse(obj, ClusterView([obj], secrets={"tw-alpha-token": secret}))
    assert isinstance(cfg, TenantConfig)
    assert cfg.all_tokens() == (
        ("token", "primary-0001", "invoke"),
        ("read-token", "reader-0003", "read"),
        ("token.next", "next-0002", "invoke"),
    )
    assert cfg.rate_limit == RateLimit(requests_per_second=3, burst=6)


def test_an_audit_log_path_that_cannot_be_written_stops_the_shard_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "tensorwasm.runtime", "--tenants-file", "examples/tenants.yaml",
         "--listen", "127.0.0.1:0", "--admin-listen", "off", "--accelerator", "cpu",
         "--audit-log", str(blocker / "audit.log")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--audit-log: cannot write" in proc.stderr


def test_a_job_survives_its_client_going_away(shard_server) -> None:
    cfg = tenant("alpha")
    server = shard_server([cfg])
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        b"POST /v1/functions/echo/invoke?mode=async HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {cfg.token}\r\nContent-Length: 7\r\n\r\nsurvive".encode()
    )
    sock.close()  # gone before reading the 202

    def finished() -> list[dict[str, Any]] | None:
        jobs = server.request("GET", "/v1/jobs", token=cfg.token).json()["jobs"]
        return jobs if jobs and jobs[0]["state"] == "succeeded" else None

    job = _until(finished, "the job to finish without its client")[0]
    assert base64.b64decode(_job(server, cfg, job["id"]).json()["output"]) == b"survive"
