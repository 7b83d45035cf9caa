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
