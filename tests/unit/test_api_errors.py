"""Every error path of the HTTP API, against a real shard: status code, envelope kind and details."""

from __future__ import annotations

import http.client
import json
import struct
import threading

import pytest

from tests.conftest import wait_for
from tests.runtime_fixtures import RuntimeServer, runtime_server, tenant  # noqa: F401  (fixture)

ALPHA = tenant("alpha", "echo.wat", ["echo"], max_body_bytes=1024)
BETA = tenant("beta", "sum.wat", ["sum"])


@pytest.fixture
def server(runtime_server) -> RuntimeServer:  # noqa: F811
    return runtime_server([ALPHA, BETA])


def error_of(reply) -> dict:  # type: ignore[no-untyped-def]
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    return reply.json()["error"]


def test_missing_token_is_401_with_challenge(server: RuntimeServer) -> None:
    reply = server.request("POST", "/v1/functions/echo/invoke", b"x")
    assert reply.status == 401
    assert error_of(reply)["kind"] == "unauthenticated"
    assert reply.headers["www-authenticate"].startswith("Bearer")


def test_unknown_token_is_401(server: RuntimeServer) -> None:
    reply = server.request("POST", "/v1/functions/echo/invoke", b"x", token="not-a-real-token")
    assert reply.status == 401
    assert error_of(reply)["message"] == "unknown token"


def test_a_token_only_reaches_its_own_tenant(server: RuntimeServer) -> None:
    # alpha's token on beta's function: beta's function does not exist for alpha.
    assert server.invoke(ALPHA, "sum", b"\x01\x00\x00\x00").status == 404
    # alpha's token on beta's tenant route: forbidden, whatever the function.
    reply = server.request("POST", "/v1/tenants/beta/functions/sum/invoke", b"", token=ALPHA.token)
    assert reply.status == 403
    assert error_of(reply)["kind"] == "forbidden"
    # ...and the same answer for a tenant that does not exist (tokens do not probe the shard).
    reply = server.request("POST", "/v1/tenants/nobody/functions/sum/invoke", b"", token=ALPHA.token)
    assert reply.status == 403
    # The tenant route with the right token works.
    reply = server.request(
        "POST", "/v1/tenants/beta/functions/sum/invoke", struct.pack("<2i", 2, 3), token=BETA.token
    )
    assert reply.status == 200 and struct.unpack("<q", reply.body) == (5,)
    listed = server.request("GET", "/v1/functions", token=ALPHA.token).json()
    assert listed["tenant"] == "alpha" and listed["functions"] == ["echo"]


def test_unknown_or_unlisted_function_is_404_with_the_list(server: RuntimeServer) -> None:
    for name in ("nope", "tw_alloc"):
        reply = server.invoke(ALPHA, name, b"")
        assert reply.status == 404
        err = error_of(reply)
        assert err["kind"] == "not_found" and err["functions"] == ["echo"]


def test_unknown_route_and_wrong_method_use_the_envelope(server: RuntimeServer) -> None:
    reply = server.request("GET", "/v2/whatever")
    assert reply.status == 404 and error_of(reply)["kind"] == "not_found"
    reply = server.request("GET", "/v1/functions/echo/invoke", token=ALPHA.token)
    assert reply.status == 405 and error_of(reply)["kind"] == "method_not_allowed"
    assert "POST" in reply.headers["allow"]


def test_body_over_the_tenant_limit_is_413_before_running(server: RuntimeServer) -> None:
    assert server.invoke(ALPHA, "echo", b"x" * 1024).status == 200
    reply = server.invoke(ALPHA, "echo", b"x" * 1025)
    assert reply.status == 413
    err = error_of(reply)
    assert err["kind"] == "payload_too_large" and err["limit"] == 1024
    # beta keeps the 1 MiB default: the limit is per tenant.
    assert server.invoke(BETA, "sum", b"\x00" * 4096).status == 200


def test_chunked_body_over_the_limit_is_413(server: RuntimeServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    chunks = iter([b"y" * 600, b"y" * 600])
    conn.request(
        "POST",
        "/v1/functions/echo/invoke",
        body=chunks,
        encode_chunked=True,
        headers={"Authorization": f"Bearer {ALPHA.token}", "Transfer-Encoding": "chunked"},
    )
    resp = conn.getresponse()
    assert resp.status == 413
    assert json.loads(resp.read())["error"]["kind"] == "payload_too_large"
    conn.close()


def test_runaway_guest_is_504_and_the_tenant_keeps_serving(runtime_server) -> None:  # noqa: F811
    spin = tenant("spinner", "runaway.wat", ["spin", "ok"], timeout_ms=200)
    server = runtime_server([spin])
    reply = server.invoke(spin, "spin")
    assert reply.status == 504
    assert error_of(reply)["kind"] == "deadline_exceeded"
    assert server.invoke(spin, "ok").status == 200


def test_memory_bomb_and_deep_recursion_fail_alone(runtime_server) -> None:  # noqa: F811
    bomb = tenant("bomb", "memory_bomb.wat", ["bomb", "ok"], linear_memory_bytes=4 << 20)
    deep = tenant("deep", "recursion.wat", ["recurse", "ok"])
    server = runtime_server([bomb, deep, ALPHA])
    reply = server.invoke(bomb, "bomb")
    assert reply.status in (500, 507), reply.body
    assert error_of(reply)["kind"] in ("guest_memory_exceeded", "guest_trap")
    reply = server.invoke(deep, "recurse")
    assert reply.status == 500 and error_of(reply)["kind"] == "guest_trap"
    assert server.invoke(bomb, "ok").status == 200
    assert server.invoke(deep, "ok").status == 200
    assert server.invoke(ALPHA, "echo", b"still here").body == b"still here"


def test_full_queue_is_429_with_retry_after(runtime_server) -> None:  # noqa: F811
    spin = tenant("busy", "runaway.wat", ["spin", "ok"], timeout_ms=1500, max_concurrency=1, queue_length=1)
    server = runtime_server([spin, ALPHA])
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(server.invoke(spin, "spin").status)) for _ in range(2)
    ]
    for t in threads:
        t.start()
    # Both spins taken (one running, one queued) before the third comes: the queue is full.
    wait_for(lambda: server.shard.served["busy"].queue.outstanding == 2, 60, "both spins admitted")
    reply = server.invoke(spin, "ok")
    assert reply.status == 429
    err = error_of(reply)
    assert err["kind"] == "queue_full" and err["retry_after_s"] > 0
    assert int(reply.headers["retry-after"]) >= 1
    # Another tenant is not queued behind the busy one.
    assert server.invoke(ALPHA, "echo", b"a").status == 200
    metrics = server.request("GET", "/metrics").body.decode()
    assert 'tensorwasm_queue_depth{tenant="busy"} 1.0' in metrics
    assert 'tensorwasm_invocations_in_flight{tenant="busy"} 1.0' in metrics
    # Each spin ends at its deadline, one after the other; on a loaded box a 1.5 s deadline has
    # taken 4.5 s (the epoch ticker's sleeps run long), so the join waits as long as it takes.
    for t in threads:
        t.join(120)
    assert sorted(results) == [504, 504]
    assert 'outcome="queue_full",tenant="busy"' in server.request("GET", "/metrics").body.decode()


def test_gpu_cap_error_carries_requested_limit_and_current(runtime_server) -> None:  # noqa: F811
    gpu = tenant("gpu", "vector_add.wat", ["vector_add"], gpu_memory_bytes=6 << 20, max_body_bytes=16 << 20)
    server = runtime_server([gpu])
    n = 4
    ok = server.invoke(gpu, "vector_add", struct.pack("<I", n) + struct.pack(f"<{2 * n}f", *range(2 * n)))
    assert ok.status == 200, ok.body
    assert struct.unpack(f"<{n}f", ok.body) == (4.0, 6.0, 8.0, 10.0)
    # Each small buffer reserves one 2 MiB pool page (6 MiB for a, b, out); 4 MiB buffers do not fit.
    n = 1 << 20
    reply = server.invoke(gpu, "vector_add", struct.pack("<I", n) + b"\x00" * (8 * n))
    assert reply.status == 507, reply.body
    err = error_of(reply)
    assert err["kind"] == "gpu_memory_exhausted"
    assert err["limit"] == 6 << 20 and err["requested"] == 4 << 20 and err["current"] == 4 << 20
    # The guest freed what it had: the tenant can still run small vectors.
    assert server.invoke(gpu, "vector_add", struct.pack("<I", 1) + struct.pack("<2f", 1, 2)).status == 200


def test_a_tenant_whose_module_was_refused_answers_503(runtime_server) -> None:  # noqa: F811
    from dataclasses import replace

    bad = replace(tenant("broken"), module=replace(ALPHA.module, sha256="0" * 64))
    server = runtime_server([bad, ALPHA])
    reply = server.invoke(bad, "echo", b"")
    assert reply.status == 503
    err = error_of(reply)
    assert err["kind"] == "tenant_not_ready" and err["reason"] == "DigestMismatch"
    assert server.invoke(ALPHA, "echo", b"ok").status == 200
