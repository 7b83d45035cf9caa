"""The invoke API end to end: a real shard on an ephemeral port, real WAT guests, raw bytes in and out."""

from __future__ import annotations

import struct

from tests.runtime_fixtures import runtime_server, tenant  # noqa: F401  (fixture)


def test_echo_returns_the_body_unchanged(runtime_server) -> None:  # noqa: F811
    alpha = tenant("alpha", "echo.wat", ["echo"])
    server = runtime_server([alpha])
    reply = server.invoke(alpha, "echo", b"hello \x00\xff world")
    assert reply.status == 200, reply.body
    assert reply.body == b"hello \x00\xff world"
    assert reply.headers["content-type"] == "application/octet-stream"


def test_sum_adds_little_endian_ints(runtime_server) -> None:  # noqa: F811
    beta = tenant("beta", "sum.wat", ["sum"])
    server = runtime_server([beta])
    reply = server.invoke(beta, "sum", struct.pack("<4i", 1, 2, 3, -10))
    assert reply.status == 200, reply.body
    assert struct.unpack("<q", reply.body) == (-4,)


def test_json_in_json_out(runtime_server) -> None:  # noqa: F811
    alpha = tenant("alpha", "echo.wat", ["echo"])
    server = runtime_server([alpha])
    reply = server.invoke(alpha, "echo", b'{"x": [1, 2]}', headers={"Content-Type": "application/json"})
    assert reply.status == 200 and reply.json() == {"x": [1, 2]}
    assert reply.headers["content-type"] == "application/json"


def test_list_functions_shows_the_tenants_limits(runtime_server) -> None:  # noqa: F811
    alpha = tenant("alpha", "echo.wat", (), max_body_bytes=4096, gpu_memory_bytes=8 << 20)
    server = runtime_server([alpha])
    listed = server.request("GET", "/v1/functions", token=alpha.token).json()
    assert listed["functions"] == ["echo"]  # no list configured: every callable export
    assert listed["limits"]["maxBodyBytes"] == 4096 and listed["limits"]["gpuMemoryBytes"] == 8 << 20
