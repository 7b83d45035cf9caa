"""Review R2's async-job and HTTP findings, fixed (helper F2): a chunked body is charged what arrived
(G8), a big job read holds the shard-wide encoding slots only while it encodes and a client that
stops reading is closed, and an output read when its job is forgotten stays charged until sent (G1),
a cancelled queued job's body leaves the worker queue with its charge (G2), an upload that completes
at a move barrier is refused tenant_moving (G3) and a job refused there is audited so (G6).
Real shard and HTTP on loopback where the finding is about the server; every wait is on observable
state (a socket's bytes, a job's state, an audit line), never on time."""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tensorwasm.runtime.api.admission import AdmissionLimits
from tensorwasm.runtime.api.app import BIG_VIEWS_PER_TENANT
from tensorwasm.runtime.api.jobs import JobBody, JobLimits, run_job
from tensorwasm.runtime.audit import AuditLog, AuditSettings
from tensorwasm.runtime.errors import Cancelled
from tensorwasm.runtime.tenancy.runs import GuestRun
from tests.conftest import wait_for
from tests.runtime_fixtures import RuntimeServer, tenant
from tests.unit.test_runtime_jobs import shard_server  # noqa: F401 (the fixture)

DEADLINE_S = 60.0
SPIN = "/v1/functions/spin/invoke?mode=async"
ECHO = "/v1/functions/echo/invoke?mode=async"
ShardServer = Callable[..., RuntimeServer]


@contextmanager
def _never_reading(server: RuntimeServer, path: str, token: str) -> Iterator[socket.socket]:
    """A client that sends GET `path` and then reads nothing (a 4 KiB receive buffer), yielded
    once the answer's first bytes have reached it: the handler is sending."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(DEADLINE_S)
        s.connect(("127.0.0.1", server.port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        assert s.recv(12, socket.MSG_PEEK | socket.MSG_WAITALL).startswith(
            b"HTTP/1.1 200"
        )  # peeked: still unread
        yield s
    finally:
        s.close()


def _read_all(s: socket.socket) -> int:
    """Bytes the client gets until the server closes (or resets) the connection."""
    got = 0
    try:
        while chunk := s.recv(1 << 20):
            got += len(chunk)
    except ConnectionResetError:
        pass
    return got


def _done_job(server: RuntimeServer, token: str, body: bytes) -> dict[str, Any]:
    """Submit an echo job and wait for its end, looking at the job list (no output in it: a big
    job view is a read that a short read_stall_s would close on a busy box)."""
    job = server.request("POST", ECHO, body, token=token)
    assert job.status == 202, job.body
    job_id = job.json()["id"]

    def ended() -> dict[str, Any] | None:
        for view in server.request("GET", "/v1/jobs", token=token).json()["jobs"]:
            if view["id"] == job_id and view["state"] not in ("queued", "running"):
                return view  # type: ignore[no-any-return]
        return None

    return wait_for(ended, DEADLINE_S, f"job {job_id} to end", interval=0.02)  # type: ignore[no-any-return]


def _fits(server: RuntimeServer, token: str, size: int) -> dict[str, Any] | None:
    """One poll: does a job with a `size`-byte output fit the tenant's output budget now? A probe
    job that failed is deleted at once, so polling leaves no job behind and can never fill the
    tenant's job table (`jobs_full`) however long the wait (review R3 K10)."""
    view = _done_job(server, token, b"w" * size)
    if view["state"] == "succeeded":
        return view
    assert view["error"]["limit"] == "jobOutputBytes", view  # the only refusal expected meanwhile
    gone = server.request("DELETE", f"/v1/jobs/{view['id']}", token=token)
    assert gone.status == 200, gone.body
    assert all(j["id"] != view["id"] for j in server.request("GET", "/v1/jobs", token=token).json()["jobs"])
    return None


# --- G8: a chunked async body is charged what arrived, not the tenant's maxBodyBytes ---


def test_a_chunked_async_job_is_charged_what_arrived_not_its_max_body(shard_server: ShardServer) -> None:  # noqa: F811
    spinner = tenant("spinner", "runaway.wat", timeout_ms=600_000, max_concurrency=2, max_body_bytes=900)
    other = tenant("other", max_body_bytes=1 << 20)
    server = shard_server([spinner, other], admission=AdmissionLimits(inflight_body_bytes=1000))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE_S)
    try:
        conn.request(
            "POST", SPIN, body=iter([b"x"]), encode_chunked=True,
            headers={"Authorization": f"Bearer {spinner.token}", "Transfer-Encoding": "chunked"},
        )  # fmt: skip
        resp = conn.getresponse()
        job = json.loads(resp.read())
        assert resp.status == 202, job
    finally:
        conn.close()
    # The 1-byte job spins on: 1 + 200 bytes fit the 1000-byte budget (900 + 200 would not).
    reply = server.request("POST", "/v1/functions/echo/invoke", b"y" * 200, token=other.token)
    assert reply.status == 200 and reply.body == b"y" * 200, reply.body
    server.request("DELETE", f"/v1/jobs/{job['id']}", token=spinner.token)


# --- G1: big job reads and clients that do not read ---


def test_never_reading_clients_of_big_job_views_hold_up_no_other_tenants_view(
    shard_server: ShardServer,  # noqa: F811
) -> None:
    alpha = tenant("alpha", max_body_bytes=16 << 20, max_output_bytes=16 << 20)
    beta = tenant("beta", max_body_bytes=1 << 20)
    server = shard_server([alpha, beta], jobs=JobLimits(read_stall_s=600))  # nobody is closed here
    big = _done_job(server, alpha.token, b"z" * (8 << 20))
    small = _done_job(server, beta.token, b"q" * (100 << 10))  # >= INLINE_OUTPUT_BYTES: a big view too
    path = f"/v1/jobs/{big['id']}"
    with ExitStack() as readers:
        for _ in range(BIG_VIEWS_PER_TENANT):
            # Each of alpha's reads is sending (more than any socket buffer holds) and never finishes.
            readers.enter_context(_never_reading(server, path, alpha.token))
        view = server.request("GET", f"/v1/jobs/{small['id']}", token=beta.token, timeout=DEADLINE_S)
        assert view.status == 200 and view.json()["outputBytes"] == 100 << 10
        # Alpha's own next big view is refused (each holds an encoded slice); its raw bytes are not.
        more = server.request("GET", path, token=alpha.token)
        assert more.status == 429 and more.json()["error"]["kind"] == "overloaded", more.body
        assert "retry-after" in more.headers


def test_a_client_that_stops_reading_a_job_is_closed_and_its_output_given_back(
    shard_server: ShardServer,  # noqa: F811
) -> None:
    alpha = tenant("alpha", max_body_bytes=16 << 20, max_output_bytes=16 << 20)
    server = shard_server([alpha], jobs=JobLimits(output_bytes_per_tenant=10 << 20, read_stall_s=0.2))
    big = _done_job(server, alpha.token, b"z" * (8 << 20))
    with _never_reading(server, f"/v1/jobs/{big['id']}", alpha.token) as reader:
        assert server.request("DELETE", f"/v1/jobs/{big['id']}", token=alpha.token).status == 200

        # 8 MiB charged while the read holds it; once the stalled read is closed, 3 MiB more fit.
        wait_for(
            lambda: _fits(server, alpha.token, 3 << 20),
            DEADLINE_S,
            "the stalled read to be closed and its output given back",
            interval=0.05,
        )
        whole = int(reader.recv(4096, socket.MSG_PEEK).split(b"Content-Length: ")[1].split(b"\r\n")[0])
        assert _read_all(reader) < whole  # closed: the client never gets the rest


def test_an_output_forgotten_while_it_is_read_stays_charged_until_sent(shard_server: ShardServer) -> None:  # noqa: F811
    alpha = tenant("alpha", max_body_bytes=16 << 20, max_output_bytes=16 << 20)
    server = shard_server([alpha], jobs=JobLimits(output_bytes_per_tenant=10 << 20, read_stall_s=600))
    big = _done_job(server, alpha.token, b"z" * (8 << 20))
    with _never_reading(server, f"/v1/jobs/{big['id']}/output", alpha.token):
        assert server.request("DELETE", f"/v1/jobs/{big['id']}", token=alpha.token).status == 200
        # The raw read still holds the 8 MiB: they count against the 10 MiB job output budget.
        over = _done_job(server, alpha.token, b"w" * (3 << 20))
        assert over["state"] == "failed" and over["error"]["limit"] == "jobOutputBytes", over

    # The client went away (its socket closed unread): the read ends and the bytes go back.
    wait_for(
        lambda: _fits(server, alpha.token, 3 << 20),
        DEADLINE_S,
        "the read to end and its output to be given back",
        interval=0.05,
    )


# --- G2: a cancelled queued job's body leaves the worker queue, then its charge goes back ---


def _queued_body_bytes(queue: Any) -> int:
    """Bytes objects of at least 600 bytes reachable from the tenant's worker queue's entries
    (an entry, or one level into it: a holder's slots)."""
    total = 0
    (entries,) = [r for r in gc.get_referents(queue._jobs) if isinstance(r, list)]
    for entry in entries:
        for part in gc.get_referents(entry):
            inner = [part] if isinstance(part, bytes) else gc.get_referents(part)
            total += sum(len(x) for x in inner if isinstance(x, bytes) and len(x) >= 600)
    return total


def test_a_cancelled_queued_jobs_body_leaves_the_worker_queue(shard_server: ShardServer) -> None:  # noqa: F811
    cfg = tenant("spinner", "runaway.wat", timeout_ms=600_000, max_concurrency=1, queue_length=16)
    server = shard_server([cfg], admission=AdmissionLimits(inflight_body_bytes=1000))
    queue = server.shard.served["spinner"].queue
    first = server.request("POST", SPIN, b"x", token=cfg.token).json()["id"]
    wait_for(lambda: queue._jobs.qsize() == 0, DEADLINE_S, "the first job taken by the worker", interval=0.02)
    for i in range(8):
        reply = server.request("POST", SPIN, b"b" * 600, token=cfg.token)
        assert reply.status == 202, (i, reply.body)
        job = reply.json()["id"]
        assert server.request("DELETE", f"/v1/jobs/{job}", token=cfg.token).json()["state"] == "cancelled"
        assert server.request("DELETE", f"/v1/jobs/{job}", token=cfg.token).status == 200  # forgotten
    # Eight entries wait behind the running job; none holds its 600-byte body any more.
    assert queue.outstanding == 9 and queue._jobs.qsize() == 8
    assert _queued_body_bytes(queue) == 0
    # And their charges are back: 999 bytes fit beside the running job's 1.
    fits = server.request("POST", SPIN, b"c" * 999, token=cfg.token)
    assert fits.status == 202, fits.body
    for job in (fits.json()["id"], first):
        server.request("DELETE", f"/v1/jobs/{job}", token=cfg.token)


def test_a_job_body_is_released_once_whoever_lets_go_of_it() -> None:
    loop = asyncio.new_event_loop()
    try:
        released: list[int] = []
        dropped = JobBody(b"body", lambda: released.append(1), loop)
        dropped.drop()  # cancelled while queued: released at once, and a worker then runs nothing
        assert released == [1]
        run = GuestRun()
        run.cancel("cancelled by DELETE /v1/jobs")
        try:
            run_job((run, lambda f, b: b, "echo"), dropped)
            raise AssertionError("a dropped body ran")
        except Cancelled:
            pass
        dropped.drop()
        assert released == [1]  # once
        taken = JobBody(b"body", lambda: released.append(2), loop)
        seen: list[bytes] = []

        def invoke(function: str, body: bytes) -> bytes:
            taken.drop()  # a cancel while it runs: the worker still has the body, nothing released
            seen.append(body)
            return body

        worker = threading.Thread(target=run_job, args=((GuestRun(), invoke, "echo"), taken))
        worker.start()
        worker.join(DEADLINE_S)
        assert seen == [b"body"] and released == [1]
        loop.run_until_complete(asyncio.sleep(0))  # the run's end hands the release to the loop
        assert released == [1, 2]
    finally:
        loop.close()


# --- G3, G6: the move barrier and async jobs ---


async def _hold(server: RuntimeServer, name: str) -> bool:
    return server.shard.hold(name)


def test_an_async_upload_completing_at_a_move_barrier_is_refused_tenant_moving(
    shard_server: ShardServer,  # noqa: F811
) -> None:
    cfg = tenant("spinner", "runaway.wat", timeout_ms=600_000, max_concurrency=1, queue_length=4)
    server = shard_server([cfg])
    queue = server.shard.served["spinner"].queue
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S) as s:
        s.sendall(
            f"POST {SPIN} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {cfg.token}\r\n"
            "Content-Length: 100\r\n\r\n".encode()
            + b"a" * 10
        )
        wait_for(lambda: queue.outstanding == 1, DEADLINE_S, "the upload admitted", interval=0.02)
        assert server.run(_hold(server, "spinner"))  # the barrier begins while the body arrives
        s.sendall(b"a" * 90)
        reply = b""
        while chunk := s.recv(65536):  # refused: the connection is closed after the answer
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), reply
    assert json.loads(body)["error"]["kind"] == "tenant_moving"
    # Nothing started after the barrier: it is drained, and no job was made.
    assert queue.outstanding == 0 and server.shard.drained("spinner")
    server.shard.release("spinner")
    assert server.request("GET", "/v1/jobs", token=cfg.token).json()["jobs"] == []


def test_a_job_refused_at_the_move_barrier_is_audited_as_the_job_says(
    shard_server: ShardServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    cfg = tenant("spinner", "runaway.wat", timeout_ms=600_000, max_concurrency=1, queue_length=4)
    audit = AuditLog(AuditSettings(target=str(tmp_path / "audit.log"), flush_s=0.01)).start()
    try:
        server = shard_server([cfg], audit=audit)
        running, queued = (server.request("POST", SPIN, b"", token=cfg.token).json()["id"] for _ in range(2))
        assert server.run(_hold(server, "spinner"))  # refuse_queued: the queued job fails tenant_moving
        server.shard.release("spinner")
        view = server.request("GET", f"/v1/jobs/{queued}", token=cfg.token).json()
        assert view["state"] == "failed" and view["error"]["kind"] == "tenant_moving", view

        def job_record() -> dict[str, Any] | None:
            for line in (tmp_path / "audit.log").read_text().splitlines():
                rec = json.loads(line)
                if rec["action"] == "job" and rec["job"] == queued:
                    return rec  # type: ignore[no-any-return]
            return None

        rec = wait_for(job_record, DEADLINE_S, "the refused job's audit record", interval=0.02)
        server.request("DELETE", f"/v1/jobs/{running}", token=cfg.token)
    finally:
        audit.close()
    assert (rec["outcome"], rec["status"]) == ("tenant_moving", 503), rec
