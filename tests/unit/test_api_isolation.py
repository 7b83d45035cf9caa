"""A runaway or memory-bombing tenant fails alone: its neighbour keeps being served, correctly.

Real shard on an ephemeral port, real guests. The attackers are separate client processes hammering
their own tenants (as remote clients would) while the neighbour is invoked from this process: every
neighbour invoke answers 200 with its own bytes, the attackers are stopped by the epoch deadline and
the store limit and counted as such. How much the attacks cost the neighbour's latency is a
benchmark's question, not a test's (bench/bench_noisy.py: the runaway and memory phases, against
the idle P99 of the same run, in docs/performance.md "Noisy neighbour").
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable

from tests.conftest import wait_for
from tests.runtime_fixtures import RuntimeServer, runtime_server, tenant  # noqa: F401  (fixture)

VICTIM = tenant("victim", "echo.wat", ["echo"], max_concurrency=2)
SPIN = tenant("spin", "runaway.wat", ["spin"], max_concurrency=1, queue_length=2, timeout_ms=100)
BOMB = tenant(
    "bomb", "memory_bomb.wat", ["bomb"], max_concurrency=1, queue_length=2, linear_memory_bytes=8 << 20
)
INVOKES = 300

ATTACKER = """
import http.client, sys
port, token, fn = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conn = http.client.HTTPConnection("127.0.0.1", port)
while True:
    conn.request("POST", f"/v1/functions/{fn}/invoke", b"", {"Authorization": "Bearer " + token})
    conn.getresponse().read()
"""


def counted(metrics: str, tenant_name: str, outcome: str) -> float:
    pattern = (
        rf'tensorwasm_invocations_total{{function="\w+",outcome="{outcome}",tenant="{tenant_name}"}} (\S+)'
    )
    return sum(float(m) for m in re.findall(pattern, metrics))


def _attacks_landing(server: RuntimeServer, before: tuple[float, float]) -> bool:
    metrics = server.request("GET", "/metrics").body.decode()
    spun = counted(metrics, "spin", "deadline_exceeded")
    bombed = counted(metrics, "bomb", "guest_memory_exceeded") + counted(metrics, "bomb", "guest_trap")
    return spun > before[0] and bombed > before[1]


def test_a_neighbour_is_served_correctly_through_a_runaway_and_a_memory_bomb(
    runtime_server: Callable[..., RuntimeServer],  # noqa: F811
) -> None:
    server = runtime_server([VICTIM, SPIN, BOMB])
    attackers = [
        subprocess.Popen([sys.executable, "-c", ATTACKER, str(server.port), cfg.token, fn])
        for cfg, fn in ((SPIN, "spin"), (BOMB, "bomb"))
    ]
    try:
        # Both attacks are landing (each stopped at least once) before the neighbour is measured ...
        wait_for(lambda: _attacks_landing(server, (0, 0)), 60, "both attackers stopped by their limits")
        metrics = server.request("GET", "/metrics").body.decode()
        mark = (
            counted(metrics, "spin", "deadline_exceeded"),
            counted(metrics, "bomb", "guest_memory_exceeded") + counted(metrics, "bomb", "guest_trap"),
        )
        served = 0

        def serve_neighbour() -> bool:
            nonlocal served
            for _ in range(50):
                body = f"payload-{served}".encode()
                reply = server.invoke(VICTIM, "echo", body)
                assert (reply.status, reply.body) == (200, body), served
                served += 1
            # ... and they kept landing while it was served (the neighbour was not served in a lull).
            return served >= INVOKES and _attacks_landing(server, mark)

        wait_for(serve_neighbour, 120, "the neighbour served while both attacks landed again", interval=0)
    finally:
        for proc in attackers:
            proc.kill()
            proc.wait()
    metrics = server.request("GET", "/metrics").body.decode()
    assert counted(metrics, "spin", "ok") == 0 and counted(metrics, "bomb", "ok") == 0
    assert counted(metrics, "victim", "ok") == served
