"""Idle tenants sleep in a snapshot and wake on their first request (a real shard, CPU backend, real modules).

The tenant is tests/fixtures/counter.wat: its total lives in a GPU buffer, so a wake that lost or
duplicated anything shows in the number it answers.
"""

# ruff: noqa: F811  (pytest fixtures are imported by name and taken as parameters)
from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from tensorwasm.runtime.shard import ASLEEP, LOADED
from tensorwasm.runtime.snapshots.store import SnapshotStore
from tensorwasm.runtime.tenancy.config import TenantConfig
from tests.conftest import wait_for as poll_until
from tests.runtime_fixtures import RuntimeServer, runtime_server, start_runtime_server, tenant  # noqa: F401

CAP = 4 << 20  # two 2 MiB pages of the CPU backend's pool granularity


def counter(name: str, after: str | None = "200ms", **limits: Any) -> TenantConfig:
    cfg = tenant(name, "counter.wat", ["add"], gpu_memory_bytes=CAP, **limits)
    return replace(cfg, uid=f"uid-{name}", idle_after=after)


def add(server: RuntimeServer, cfg: TenantConfig, n: int = 1) -> int:
    reply = server.invoke(cfg, "add", struct.pack("<q", n))
    assert reply.status == 200, (reply.status, reply.body)
    return int(struct.unpack("<q", reply.body)[0])


def wait_for(what: Callable[[], bool], deadline_s: float = 60.0) -> None:
    poll_until(what, deadline_s, "the condition", interval=0.01)


def reason(server: RuntimeServer, name: str) -> str:
    status = server.shard.status(name)
    return status.reason if status is not None else ""


def open_devices(server: RuntimeServer) -> dict[str, tuple[int, int | None]]:
    """tenant -> (bytes in use, cap) of every device the accelerator has open now."""
    return {u.tenant_id: (u.bytes_in_use, u.cap_bytes) for u in server.shard.accelerator.usage()}  # type: ignore[union-attr]


def state_of(server: RuntimeServer, name: str) -> tuple[bytes, list[Any], dict[int, bytes]]:
    """Wasm memory, globals and every GPU buffer (by handle) every invoke starts from."""
    t = server.shard.served[name]
    wasm = t.pool.capture_state()
    device = t.device
    assert device is not None
    gpu = {h: device.read(h, 0, n) for h, n in device.buffers().items()}
    return bytes(wasm.memory), list(wasm.globals), gpu


def sleeping_shard(runtime_server: Callable[..., RuntimeServer], tmp_path: Path, *configs: TenantConfig,
                   **options: Any) -> RuntimeServer:  # fmt: skip
    return runtime_server(list(configs), sleep_store=SnapshotStore(tmp_path / "store"), **options)


def test_an_idle_tenant_sleeps_gives_its_gpu_back_and_wakes_bit_identical(runtime_server, tmp_path) -> None:
    alpha = counter("alpha")
    server = sleeping_shard(runtime_server, tmp_path, alpha)
    assert add(server, alpha, 41) == 41
    before = state_of(server, "alpha")
    wait_for(lambda: reason(server, "alpha") == ASLEEP)
    assert "alpha" not in open_devices(server)  # its CUDA pool and GPU memory are released
    assert server.shard.served["alpha"].asleep and server.shard.residency.used == 0
    status = server.shard.status("alpha")
    assert status is not None and status.loaded and status.gpu_bytes_in_use == 0
    assert "wakes on the first request" in status.message
    metrics = server.request("GET", "/metrics").body.decode()
    assert 'tensorwasm_tenant_sleeps_total{reason="idle"}' in metrics
    # The first request wakes it and is answered from the state it slept in.
    assert add(server, alpha, 1) == 42
    assert reason(server, "alpha") == LOADED and "woke in" in server.shard.status("alpha").message  # type: ignore[union-attr]
    wait_for(lambda: reason(server, "alpha") == ASLEEP)
    assert add(server, alpha, 0) == 42
    # Bit-identical: wasm memory, globals and GPU buffers as at sleep (after a no-op add, which
    # writes the same total back).
    after = state_of(server, "alpha")
    assert after[0] == before[0] and after[1] == before[1]
    assert list(after[2].values()) == [struct.pack("<q", 42)] and list(before[2].values()) == [
        struct.pack("<q", 41)
    ]
    metrics = server.request("GET", "/metrics").body.decode()
    assert 'tensorwasm_tenant_wakes_total{source="file"}' in metrics
    assert "tensorwasm_tenant_wake_seconds_count" in metrics


def test_never_keeps_a_tenant_resident_while_the_shard_default_sleeps_others(
    runtime_server, tmp_path
) -> None:
    keep, nap = counter("keep", after="never"), counter("nap", after=None)
    server = sleeping_shard(runtime_server, tmp_path, keep, nap, idle_after_s=0.2)
    add(server, keep)
    add(server, nap)
    wait_for(lambda: reason(server, "nap") == ASLEEP)  # the default applied; that scan saw both
    assert reason(server, "keep") == LOADED and "keep" in open_devices(server)


def test_a_tenant_that_never_sleeps_is_never_evicted(runtime_server, tmp_path) -> None:
    keep, a, b = counter("keep", after="never"), counter("a", after="1h"), counter("b", after="1h")
    server = sleeping_shard(runtime_server, tmp_path, resident_gpu_bytes=2 * CAP)
    server.sync([keep])
    server.sync([keep, a])
    add(server, a)  # keep is now the least recently used, but pinned
    server.sync([keep, a, b])
    assert reason(server, "a") == ASLEEP and set(open_devices(server)) == {"keep", "b"}


def test_requests_during_a_wake_wait_within_the_queue_and_none_is_lost(runtime_server, tmp_path) -> None:
    # One worker: the counter's read-add-write is the guest's own and not atomic across instances.
    alpha = counter("alpha", after="1h", max_concurrency=1, queue_length=4)
    # Four workers: concurrent requests wait on the wake itself; echo shows each got its own answer.
    echo = replace(tenant("echo", "echo.wat", ["echo"], max_concurrency=4, queue_length=2), uid="uid-echo",
                   idle_after="1h")  # fmt: skip
    server = sleeping_shard(runtime_server, tmp_path, alpha, echo)
    add(server, alpha, 100)
    assert server.run(server.shard.sleep("alpha")) and server.run(server.shard.sleep("echo"))
    start = threading.Barrier(24)

    def call(i: int) -> tuple[int, str | None, bool]:
        start.wait()
        if i % 2:
            reply = server.invoke(echo, "echo", f"body-{i}".encode())
            return (
                reply.status,
                reply.headers.get("retry-after"),
                reply.status != 200 or reply.body == f"body-{i}".encode(),
            )
        reply = server.invoke(alpha, "add", struct.pack("<q", 1))
        return reply.status, reply.headers.get("retry-after"), True

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, range(24)))
    assert all(ok for _, _, ok in results)  # every answered echo is its own request's
    assert {status for status, _, _ in results} <= {200, 429}
    assert all(retry is not None and int(retry) >= 1 for status, retry, _ in results if status == 429)
    served = sum(1 for i, (status, _, _) in enumerate(results) if status == 200 and i % 2 == 0)
    assert served >= 1 and sum(1 for i, (st, _, _) in enumerate(results) if st == 200 and i % 2) >= 1
    assert add(server, alpha, 0) == 100 + served  # every answered request counted once, none lost


def test_a_refused_restore_fails_that_wake_and_the_tenant_restarts_from_its_module(
    runtime_server, tmp_path
) -> None:
    alpha = counter("alpha")
    server = sleeping_shard(runtime_server, tmp_path, alpha)
    add(server, alpha, 7)
    assert server.run(server.shard.sleep("alpha"))
    sleeper = server.shard.served["alpha"].sleeper
    assert sleeper is not None
    blob = server.shard.sleep_store.path_of(sleeper.key, sleeper.digest)  # type: ignore[union-attr]
    data = bytearray(blob.read_bytes())
    data[-40] ^= 0xFF  # damage the manifest's tail: the restore refuses it before touching state
    blob.write_bytes(bytes(data))
    reply = server.invoke(alpha, "add", struct.pack("<q", 1))
    assert reply.status == 503
    error = reply.json()["error"]
    assert error["kind"] == "tenant_not_ready" and error["reason"] == "WakeFailed"
    assert "restarts from its module" in error["message"]
    assert add(server, alpha, 1) == 1  # served again, from the module's initial state
    assert (
        reason(server, "alpha") == LOADED
        and "restarted from its module" in server.shard.status("alpha").message
    )  # type: ignore[union-attr]
    assert not blob.exists()


def test_a_tenant_updated_while_asleep_wakes_on_its_new_module(runtime_server, tmp_path) -> None:
    alpha = counter("alpha")
    server = sleeping_shard(runtime_server, tmp_path, alpha)
    add(server, alpha, 5)
    assert server.run(server.shard.sleep("alpha"))
    # Same module, another idle.after: no reload, still asleep in the same blob.
    server.sync([replace(alpha, idle_after="1h", generation=2)])
    assert server.shard.served["alpha"].asleep and reason(server, "alpha") == ASLEEP
    sleeper = server.shard.served["alpha"].sleeper
    assert sleeper is not None
    blob = server.shard.sleep_store.path_of(sleeper.key, sleeper.digest)  # type: ignore[union-attr]
    # A new module: the old snapshot is dropped, never restored into it.
    echo = replace(tenant("alpha", "echo.wat", ["echo"], token=alpha.token), uid=alpha.uid, generation=3)
    server.sync([echo])
    assert server.invoke(echo, "echo", b"new").body == b"new"
    assert not blob.exists() and reason(server, "alpha") == LOADED


def test_a_restarted_shard_keeps_its_sleepers_asleep(tmp_path) -> None:
    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    first = start_runtime_server([alpha], sleep_store=SnapshotStore(store))
    server = next(first)
    add(server, alpha, 9)
    assert server.run(server.shard.sleep("alpha"))
    for _ in first:  # stop the shard (its cleanup)
        pass
    second = start_runtime_server([alpha], sleep_store=SnapshotStore(store))
    server = next(second)
    try:
        assert reason(server, "alpha") == ASLEEP and "alpha" not in open_devices(server)
        assert add(server, alpha, 1) == 10
    finally:
        for _ in second:
            pass


def test_waking_evicts_the_least_recently_used_idle_tenant_first(runtime_server, tmp_path) -> None:
    a, b, c = counter("a", after="1h"), counter("b", after="1h"), counter("c", after="1h")
    server = sleeping_shard(runtime_server, tmp_path, resident_gpu_bytes=2 * CAP)
    server.sync([a])
    server.sync([a, b])
    add(server, a)
    add(server, b)  # a is now the least recently used
    server.sync([a, b, c])  # c's load needs room: a sleeps
    assert reason(server, "a") == ASLEEP and set(open_devices(server)) == {"b", "c"}
    add(server, a)  # the wake needs room: b (used before c loaded) sleeps
    assert reason(server, "b") == ASLEEP and set(open_devices(server)) == {"a", "c"}
    assert add(server, b, 0) == 1 and add(server, a, 0) == 2


def test_a_tenant_with_a_request_in_flight_is_never_evicted(runtime_server, tmp_path) -> None:
    spin = tenant(
        "busy", "runaway.wat", ["spin"], token="token-busy-0123456789", gpu_memory_bytes=CAP, timeout_ms=3000
    )
    busy = replace(spin, uid="uid-busy", idle_after="1h")
    nap = counter("nap", after="1h")
    server = sleeping_shard(runtime_server, tmp_path, nap, resident_gpu_bytes=CAP)
    assert server.run(server.shard.sleep("nap"))
    server.sync([nap, busy])
    running = threading.Thread(target=lambda: server.invoke(busy, "spin", b"", timeout=30))
    running.start()
    wait_for(lambda: server.shard.served["busy"].queue.in_flight == 1)
    reply = server.invoke(nap, "add", struct.pack("<q", 1))
    assert (
        reply.status == 429
        and reply.json()["error"]["kind"] == "overloaded"
        and "retry-after" in reply.headers
    )
    assert "busy" in open_devices(server) and reason(server, "nap") == ASLEEP
    running.join(30)
    assert add(server, nap) == 1  # busy finished (deadline): now it can sleep, and nap wakes


def test_a_wake_storm_never_holds_more_than_the_budget(runtime_server, tmp_path) -> None:
    """20 sleepers, room for 4, every one called 3 times at once: the reserved caps and the open
    devices' caps stay within the budget at every sample, each tenant's bytes within its cap, every
    request is answered (429s retried after Retry-After) and counted exactly once."""
    names = [f"t{i:02d}" for i in range(20)]
    configs = [counter(n, after="1h", max_concurrency=1, queue_length=8, timeout_ms=5000) for n in names]
    budget = 4 * CAP
    server = sleeping_shard(runtime_server, tmp_path, resident_gpu_bytes=budget)
    for i in range(len(configs)):
        server.sync(configs[: i + 1])  # loading past the budget puts the oldest to sleep
    for n in names:
        server.run(server.shard.sleep(n))
    assert all(server.shard.served[n].asleep for n in names)
    worst: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            devices = open_devices(server)
            assert all(used <= (cap or 0) for used, cap in devices.values())
            worst.append(max(server.shard.residency.used, sum(cap or 0 for _, cap in devices.values())))

    def call(cfg: TenantConfig) -> int:
        while True:
            reply = server.invoke(cfg, "add", struct.pack("<q", 1), timeout=60)
            if reply.status == 200:
                return 1
            assert reply.status == 429, (reply.status, reply.body)
            time.sleep(0.05)  # a real client waits Retry-After (1 s); the test only needs order

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(60) as pool:
            served = sum(pool.map(call, [cfg for cfg in configs for _ in range(3)]))
    finally:
        stop.set()
        watcher.join(30)
    assert served == 60 and worst and max(worst) <= budget
    assert server.shard.residency.peak == budget  # the storm did fill the GPU: evictions were needed
    assert all(add(server, cfg, 0) == 3 for cfg in configs)  # none lost, none doubled
