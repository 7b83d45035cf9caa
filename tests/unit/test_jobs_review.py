"""Review R's async-job findings, fixed (helper J): a big job output is base64-encoded off the
event loop (F6), expired jobs are purged for every tenant and leave the metric (F2), an async body
holds its share of the shard's in-flight body budget until its job ends (F3), a future cancelled
outside the board reads cancelled (F4), a job failed on jobOutputBytes is audited as failed (F5),
and the buckets and job tables of departed tenants are dropped (F7). Real shard and HTTP where the
finding is about the server; every wait is on observable state."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tensorwasm.api.tenant import RateLimit
from tensorwasm.runtime.api import app as app_module
from tensorwasm.runtime.api.admission import AdmissionLimits
from tensorwasm.runtime.api.app import INLINE_OUTPUT_BYTES, _Api
from tensorwasm.runtime.api.guard import ConnectionLimits
from tensorwasm.runtime.api.jobs import JobBoard, JobLimits, JobOutput
from tensorwasm.runtime.audit import AuditLog, AuditSettings
from tensorwasm.runtime.tenancy.runs import GuestRun
from tests.conftest import wait_for
from tests.runtime_fixtures import tenant
from tests.unit.test_runtime_jobs import _events, _finished, shard_server  # noqa: F401 (the fixture)

DEADLINE_S = 60.0


def _settle(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0))  # a future's done callbacks run on the loop


# --- F6: a big output is encoded on a worker thread, and the JSON shape is unchanged ---


def test_a_big_job_output_is_encoded_off_the_event_loop(shard_server, monkeypatch) -> None:  # noqa: F811
    cfg = tenant("alpha", max_body_bytes=1 << 20)
    server = shard_server([cfg])
    loop_thread = server.run(_current_thread())
    threads: list[int] = []
    real = app_module._encode_output

    def recording(output: bytes) -> list[bytes]:
        threads.append(threading.get_ident())
        return real(output)

    monkeypatch.setattr(app_module, "_encode_output", recording)
    big = bytes(range(256)) * (4 * INLINE_OUTPUT_BYTES // 256)  # 4x the inline threshold
    job = server.request("POST", "/v1/functions/echo/invoke?mode=async", big, token=cfg.token).json()
    view = _finished(server, cfg, job["id"])
    assert view["state"] == "succeeded" and view["outputBytes"] == len(big)
    assert base64.b64decode(view["output"]) == big
    assert set(view) >= {"id", "function", "createdAt", "finishedAt", "expiresAt", "location"}
    assert threads and loop_thread not in threads, (threads, loop_thread)
    # A small output stays inline (no thread hop): the encoder is not called for it.
    calls = len(threads)
    small = server.request("POST", "/v1/functions/echo/invoke?mode=async", b"tiny", token=cfg.token).json()
    small_view = _finished(server, cfg, small["id"])
    assert base64.b64decode(small_view["output"]) == b"tiny" and len(threads) == calls


async def _current_thread() -> int:
    return threading.get_ident()


# --- F2: expiry for every tenant, not only the caller; the metric stops counting them ---


def test_expired_jobs_of_an_idle_tenant_are_purged_and_leave_the_metric() -> None:
    now = [1000.0]
    board = JobBoard(JobLimits(ttl_s=60), clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        for name in ("idle", "busy"):
            fut: asyncio.Future[Any] = loop.create_future()
            board.create(name, "echo", GuestRun(), JobOutput(1 << 20), 3, fut)
            fut.set_result(b"0123456789")
        _settle(loop)
        counts = {(t, s): n for t, s, n in board.report() if n}
        assert counts == {("idle", "succeeded"): 1, ("busy", "succeeded"): 1}
        now[0] += 61
        board.admit("busy")  # another tenant's call frees the idle one's output
        assert board._tables["idle"].jobs == {} and board._tables["idle"].output_bytes == 0
        # And without any call at all, the metrics report purges before counting.
        fut2: asyncio.Future[Any] = loop.create_future()
        board.create("idle", "echo", GuestRun(), JobOutput(1 << 20), 3, fut2)
        fut2.set_result(b"xyz")
        _settle(loop)
        assert sum(n for _, _, n in board.report()) == 1
        now[0] += 61
        assert sum(n for _, _, n in board.report()) == 0
        assert board._tables["idle"].output_bytes == 0
    finally:
        loop.close()


# --- F4: a future cancelled by anyone but the board ---


def test_a_future_cancelled_outside_the_board_reads_cancelled() -> None:
    board = JobBoard()
    loop = asyncio.new_event_loop()
    try:
        fut: asyncio.Future[Any] = loop.create_future()
        job = board.create("alpha", "echo", GuestRun(), JobOutput(1 << 20), 0, fut)
        fut.cancel()
        _settle(loop)
        assert job.state == "cancelled" and job.error is not None
        assert job.error["kind"] == "cancelled" and "internal" not in job.error["message"]
        assert job.expires is not None  # it expires like any finished job
    finally:
        loop.close()


# --- F3: an async body keeps its charge until its job ends ---


def test_a_queued_async_body_holds_the_shard_body_budget_until_its_job_ends(shard_server) -> None:  # noqa: F811
    cfg = tenant("spinner", "runaway.wat", timeout_ms=600_000, max_concurrency=2)
    server = shard_server([cfg], admission=AdmissionLimits(inflight_body_bytes=1000))
    body = b"b" * 600

    def post() -> Any:
        return server.request("POST", "/v1/functions/spin/invoke?mode=async", body, token=cfg.token)

    first = post()
    assert first.status == 202, first.body
    # The first job is still running (spinning): its 600 bytes are in flight, so 600 more do not fit.
    second = post()
    assert second.status == 429 and second.json()["error"]["kind"] == "overloaded", second.body
    # Once the job ends, its charge is back and the next body fits.
    assert server.request("DELETE", f"/v1/jobs/{first.json()['id']}", token=cfg.token).status == 200

    def admitted() -> Any:
        reply = post()
        return reply if reply.status == 202 else None

    third = wait_for(admitted, DEADLINE_S, "the budget to be given back", interval=0.05)
    server.request("DELETE", f"/v1/jobs/{third.json()['id']}", token=cfg.token)


# --- F5: the job's audit record follows the job's verdict ---


def test_a_job_failed_on_its_output_budget_is_audited_as_failed(shard_server, tmp_path: Path) -> None:  # noqa: F811
    cfg = tenant("alpha")
    audit = AuditLog(AuditSettings(target=str(tmp_path / "audit.log"), flush_s=0.01)).start()
    try:
        server = shard_server([cfg], audit=audit, jobs=JobLimits(output_bytes_per_tenant=4))
        job = server.request("POST", "/v1/functions/echo/invoke?mode=async", b"hello", token=cfg.token).json()
        view = _finished(server, cfg, job["id"])
        assert view["state"] == "failed" and view["error"]["limit"] == "jobOutputBytes"

        def job_record() -> dict[str, Any] | None:
            for line in (tmp_path / "audit.log").read_text().splitlines():
                rec = json.loads(line)
                if rec["action"] == "job":
                    return rec  # type: ignore[no-any-return]
            return None

        rec = wait_for(job_record, DEADLINE_S, "the job's audit record", interval=0.02)
    finally:
        audit.close()
    assert (rec["outcome"], rec["status"], rec["bytesOut"]) == ("guest_limit_exceeded", 500, 0)


# --- F7: departed tenants' rate buckets and job tables go ---


def test_rate_buckets_and_job_tables_of_departed_tenants_are_dropped() -> None:
    alpha, beta = SimpleNamespace(name="alpha"), SimpleNamespace(name="beta")
    shard = SimpleNamespace(
        on_hold=[], served={"alpha": alpha, "beta": beta}, by_auth={}, assigned={}, holds={}
    )
    api = _Api(shard, AdmissionLimits(), ConnectionLimits())  # type: ignore[arg-type]
    spec = RateLimit(requests_per_second=10)
    loop = asyncio.new_event_loop()
    try:
        for name in ("alpha", "beta"):
            api.rates.take(name, spec)
            api.jobs.create(name, "echo", GuestRun(), JobOutput(10), 0, loop.create_future())
        api._forget_departed()
        assert len(api.rates) == 2 and len(api.jobs) == 2
        # beta leaves while gamma arrives: the count is unchanged, the set is not.
        shard.served = {"alpha": alpha, "gamma": SimpleNamespace(name="gamma")}
        shard.by_auth = {}  # the shard replaces by_auth whenever its served set changes
        api._forget_departed()
        assert len(api.rates) == 1 and len(api.jobs) == 1
        assert api.jobs.list("beta") == [] and api.jobs.list("alpha") != []
    finally:
        loop.close()


@pytest.mark.parametrize("size", [INLINE_OUTPUT_BYTES - 1, INLINE_OUTPUT_BYTES, 3 * (32 << 10) * 5 + 1])
def test_the_streamed_view_is_the_same_json_as_the_inline_one(size: int) -> None:
    board = JobBoard()
    loop = asyncio.new_event_loop()
    try:
        fut: asyncio.Future[Any] = loop.create_future()
        job = board.create("alpha", "echo", GuestRun(), JobOutput(1 << 20), 0, fut)
        fut.set_result(b"\xff" * size)
        _settle(loop)
        head = json.dumps(job.view(with_output=False))[:-1].encode()
        streamed = head + app_module._OUTPUT_KEY + b"".join(app_module._encode_output(job.output or b""))
        streamed += app_module._OUTPUT_END
        assert json.loads(streamed) == job.view()
    finally:
        loop.close()


# --- N1: the return value counts against maxOutputBytes with the streamed chunks ---


def test_a_jobs_return_value_counts_against_its_output_limit() -> None:
    board = JobBoard()
    loop = asyncio.new_event_loop()
    try:
        sink = JobOutput(5)
        fut: asyncio.Future[Any] = loop.create_future()
        job = board.create("alpha", "chunks", GuestRun(sink), sink, 0, fut)
        sink.write(b"abc")  # within the limit on its own
        fut.set_result(b"xyz")  # and so is this; together they are not
        _settle(loop)
        assert job.state == "failed" and job.error is not None
        assert job.error["kind"] == "guest_limit_exceeded" and job.error["limit"] == "maxOutputBytes"
        assert job.output is None
    finally:
        loop.close()


def test_a_streams_return_value_counts_against_its_output_limit(shard_server) -> None:  # noqa: F811
    # chunks streams its input three times (12 bytes) then returns "end" (3 more): 15 > 14.
    cfg = tenant("streamer", "streamer.wat", max_output_bytes=14)
    server = shard_server([cfg])
    r = server.request("POST", "/v1/functions/chunks/invoke?mode=stream", b"abcd", token=cfg.token)
    events = _events(r.body)
    assert events[:3] == [("text", "abcd")] * 3, events
    assert events[3][0] == "error", events
    error = json.loads(events[3][1])["error"]
    assert error["kind"] == "guest_limit_exceeded" and error["limit"] == "maxOutputBytes"
    # At the limit exactly it is one stream: 12 + 3 = 15.
    server.sync([replace(cfg, limits=replace(cfg.limits, max_output_bytes=15))])
    ok = _events(
        server.request("POST", "/v1/functions/chunks/invoke?mode=stream", b"abcd", token=cfg.token).body
    )
    assert [e for e, _ in ok] == ["text"] * 4 + ["done"], ok


# --- N9: jobs admitted while their bodies arrive are counted again before they are created ---


def test_uploads_admitted_together_cannot_pass_the_job_bound(shard_server) -> None:  # noqa: F811
    cfg = tenant("alpha")
    server = shard_server([cfg], jobs=JobLimits(per_tenant=1))
    queue = server.shard.served["alpha"].queue
    body = b"0123456789"
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S) as slow:
        slow.sendall(
            b"POST /v1/functions/echo/invoke?mode=async HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {cfg.token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:5]
        )
        # Admitted (its queue slot reserved), its body still arriving.
        wait_for(lambda: queue.outstanding == 1, DEADLINE_S, "the slow upload's admission", interval=0.02)
        fast = server.request("POST", "/v1/functions/echo/invoke?mode=async", b"x", token=cfg.token)
        assert fast.status == 202, fast.body
        slow.sendall(body[5:])
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            more = slow.recv(65536)
            if not more:
                break
            reply += more
    assert reply.startswith(b"HTTP/1.1 429"), reply
    assert b"jobs_full" in reply
    assert len(server.request("GET", "/v1/jobs", token=cfg.token).json()["jobs"]) == 1


# --- N10, N12: refusals by token scope and owner are audited with the request's mode ---


def test_scope_and_owner_refusals_are_audited_with_their_mode(shard_server, tmp_path: Path) -> None:  # noqa: F811
    reader = "read-token-0123456789"
    alpha = replace(tenant("alpha"), extra_tokens=(("read-token", reader, "read"),))
    beta = tenant("beta")
    audit = AuditLog(AuditSettings(target=str(tmp_path / "audit.log"), flush_s=0.01)).start()
    try:
        server = shard_server([alpha, beta], audit=audit)
        denied = server.request("POST", "/v1/functions/echo/invoke?mode=async", b"x", token=reader)
        assert denied.status == 403
        probe = server.request(
            "POST", "/v1/tenants/beta/functions/echo/invoke?mode=stream", b"x", token=alpha.token
        )
        assert probe.status == 403

        def records() -> list[dict[str, Any]] | None:
            lines = (tmp_path / "audit.log").read_text().splitlines()
            return [json.loads(line) for line in lines] if len(lines) >= 2 else None

        recs = wait_for(records, DEADLINE_S, "two audit records", interval=0.02)
    finally:
        audit.close()
    seen = {(r["tenant"], r["tokenId"], r["mode"], r["status"], r["outcome"]) for r in recs}
    assert seen == {
        ("alpha", "read-token", "async", 403, "forbidden"),
        ("alpha", "token", "stream", 403, "forbidden"),
    }, recs


# --- F6: the raw output route ---


def test_the_output_route_answers_the_raw_bytes_and_404_while_there_are_none(shard_server) -> None:  # noqa: F811
    cfg = tenant("alpha", max_body_bytes=4 << 20)
    spinner = tenant("spinner", "runaway.wat", timeout_ms=600_000)
    beta = tenant("beta")
    server = shard_server([cfg, spinner, beta])
    big = bytes(range(256)) * (3 << 12)  # 3 MiB: several write pieces
    job = server.request("POST", "/v1/functions/echo/invoke?mode=async", big, token=cfg.token).json()
    _finished(server, cfg, job["id"])
    raw = server.request("GET", f"/v1/jobs/{job['id']}/output", token=cfg.token)
    assert raw.status == 200 and raw.headers["content-type"] == "application/octet-stream"
    assert raw.body == big
    # Another tenant's token: 404 like an unknown id.
    assert server.request("GET", f"/v1/jobs/{job['id']}/output", token=beta.token).status == 404
    # A running job has no output yet: 404 with its state.
    running = server.request("POST", "/v1/functions/spin/invoke?mode=async", b"", token=spinner.token).json()
    none = server.request("GET", f"/v1/jobs/{running['id']}/output", token=spinner.token)
    assert none.status == 404 and none.json()["error"]["state"] in ("queued", "running"), none.body
    server.request("DELETE", f"/v1/jobs/{running['id']}", token=spinner.token)
