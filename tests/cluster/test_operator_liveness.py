"""The operator's liveness endpoint (kopf's): 200 on /healthz while it runs, nothing once it is gone."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from typing import Any

from .conftest import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return int(resp.status)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def test_liveness_answers_while_the_operator_runs(operator_runner: Any) -> None:
    port = free_port()
    operator = operator_runner(liveness_port=str(port))
    wait_for(lambda: healthz(port) == 200, 60, "GET /healthz = 200")
    operator.assert_alive()
    operator.stop()
    assert healthz(port) == 0
