"""Every resource a guest controls is bounded (issue 13): start functions and tw_init under the
deadline, tables (size and growth), output size, host calls per invoke and per second, guest log
bytes, and the compile cache that only loads artifacts this shard's key wrote."""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tensorwasm.runtime import metrics
from tensorwasm.runtime.engine import Engine
from tensorwasm.runtime.engine import pool as pool_module
from tensorwasm.runtime.engine.cache import MAGIC
from tensorwasm.runtime.errors import DeadlineExceeded, GuestLimitExceeded, ModuleRejected
from tests.conftest import wait_for
from tests.unit.engine_helpers import FIXTURES, fixture, inline, pool

LOG_IMPORT = '(import "tensorwasm" "log" (func $log (param i32 i32 i32)))'
ERR_IMPORT = '(import "tensorwasm" "last_error" (func $err (param i32 i32) (result i32)))'


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    e = Engine(park_after_s=0.05)
    yield e
    e.close()


def test_a_start_function_that_spins_fails_the_load_at_the_deadline(engine: Engine) -> None:
    module = inline(engine, "(func $spin (loop $l (br $l))) (start $spin)")
    assert module.has_start
    started = time.monotonic()
    with pytest.raises(ModuleRejected, match="deadline_exceeded: the module's start function"):
        pool(engine, module, timeout_s=0.1)
    assert time.monotonic() - started < 30  # bounded; the exact figure belongs to a benchmark


def test_a_module_with_no_guest_code_at_load_is_not_refused_for_a_slow_host(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The load deadline bounds guest code (start functions, tw_init). echo.wat has neither, so a
    # host slow to instantiate it (a busy node: each clock reading here is a second later) must not
    # refuse it; a full CI run did, with a 0.3 s timeout.
    module = fixture(engine, "echo")
    assert not module.has_start and not module.has_init
    readings = iter(range(10**6))
    monkeypatch.setattr(pool_module, "time", SimpleNamespace(monotonic=lambda: float(next(readings))))
    p = pool(engine, module, timeout_s=0.3, max_instances=1)
    assert p.invoke("echo", b"still here") == b"still here"
    p.close()


def test_start_functions_and_tw_init_share_one_load_deadline(engine: Engine) -> None:
    # Thirty start functions need ~30x what one takes; the load gets 2.2x: it must fail.
    body = """
      (global $n (mut i32) (i32.const 0))
      (func $burn (local $i i32)
        (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1)))
                 (br_if $l (i32.lt_u (local.get $i) (i32.const 150000000)))))
      (start $burn)"""
    module = inline(engine, body)
    spent = time.monotonic()
    pool(engine, module, timeout_s=30, max_instances=1).close()
    one = time.monotonic() - spent
    with pytest.raises(ModuleRejected, match="deadline"):
        pool(engine, module, timeout_s=max(one * 2.2, 0.01), max_instances=30)


def test_table_growth_is_capped_and_a_grown_instance_is_replaced(engine: Engine) -> None:
    # grow(n) / size(): the i32 result at address 0, returned as 4 bytes.
    body = """
      (table $t 1 funcref)
      (func (export "grow") (param $p i32) (param $n i32) (result i64)
        (i32.store (i32.const 0) (table.grow $t (ref.null func) (i32.load (local.get $p))))
        (i64.const 4))
      (func (export "size") (param i32 i32) (result i64)
        (i32.store (i32.const 0) (table.size $t)) (i64.const 4))"""
    module = inline(engine, body)
    assert module.tables  # the hidden table is exported for reset to see
    spawns = metrics.INSTANCE_SPAWNS.labels(tenant="test")
    p = pool(engine, module, max_instances=1, table_elements=1500)

    def call(fn: str, n: int = 0) -> int:
        return int(struct.unpack("<i", p.invoke(fn, struct.pack("<i", n)))[0])

    before = spawns._value.get()
    assert call("size") == 1
    assert spawns._value.get() == before  # no growth: reset in place
    assert call("grow", 1000) == 1  # the old size: it grew to 1001
    assert spawns._value.get() == before + 1  # the grown instance was replaced, not kept
    assert call("size") == 1  # ... so the next invoke starts from the module's table again
    assert call("grow", 2000) == -1  # past table_elements: refused like a failed memory.grow
    p.close()


def test_a_table_larger_than_the_limit_is_refused_at_load(engine: Engine) -> None:
    module = inline(engine, '(table (export "t") 5000 funcref)')
    with pytest.raises(ModuleRejected, match="failed to start"):
        pool(engine, module, table_elements=1000)


def test_output_over_the_limit_is_refused_before_it_is_copied(engine: Engine) -> None:
    echo = fixture(engine, "echo")
    p = pool(engine, echo, max_output_bytes=1000, max_instances=1)
    assert p.invoke("echo", b"x" * 1000) == b"x" * 1000
    with pytest.raises(GuestLimitExceeded, match="1001 bytes, over the 1000-byte output limit") as err:
        p.invoke("echo", b"x" * 1001)
    assert err.value.details["limit"] == "maxOutputBytes"
    assert p.invoke("echo", b"ok") == b"ok"
    p.close()


SPAM = """
  (data (i32.const 64) "spam spam spam spam")
  (func (export "spam") (param i32 i32) (result i64) (local $i i32)
    (loop $l
      (call $log (i32.const 1) (i32.const 64) (i32.const 19))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (local.get 1))))
    (i64.const 0))"""


def test_host_calls_past_the_per_invoke_cap_stop_the_guest(engine: Engine) -> None:
    module = inline(engine, SPAM, LOG_IMPORT)
    p = pool(engine, module, host_calls_per_invoke=100, log_bytes_per_invoke=0, max_instances=1)
    assert p.invoke("spam", b"\0" * 100) == b""  # len 100: exactly 100 calls
    with pytest.raises(GuestLimitExceeded, match="more than 100 host calls") as err:
        p.invoke("spam", b"\0" * 101)
    assert err.value.details["limit"] == "hostCallsPerInvoke"
    p.close()


def test_host_calls_over_the_rate_wait_on_the_invoke_deadline(engine: Engine) -> None:
    module = inline(engine, SPAM, LOG_IMPORT)
    p = pool(engine, module, host_calls_per_s=1000, log_bytes_per_invoke=0, timeout_s=1.0, max_instances=1)
    # One second's burst (1,000 calls) is free; 50,000 calls at 1,000/s cannot fit in 1 s, so the
    # guest waits for tokens until its deadline stops it. (How long it waited depends on how much CPU
    # it got on this machine: only that it waited is asserted.)
    with pytest.raises(DeadlineExceeded):
        p.invoke("spam", b"\0" * 50_000)
    assert p.budget.waited_s > 0
    p.close()


def test_log_lines_past_the_byte_budget_are_dropped_and_counted(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    module = inline(engine, SPAM, LOG_IMPORT)
    dropped = metrics.GUEST_LOG_LINES_DROPPED.labels(tenant="test")
    before = dropped._value.get()
    p = pool(engine, module, log_bytes_per_invoke=19 * 10, max_instances=1)
    with caplog.at_level(logging.INFO, logger="tensorwasm.guest"):
        p.invoke("spam", b"\0" * 25)
    assert len([r for r in caplog.records if "spam spam" in r.getMessage()]) == 10
    assert dropped._value.get() - before == 15
    p.close()


def test_log_bytes_per_second_cap_across_invokes(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    module = inline(engine, SPAM, LOG_IMPORT)
    p = pool(engine, module, log_bytes_per_s=19 * 5, max_instances=1)
    with caplog.at_level(logging.INFO, logger="tensorwasm.guest"):
        for _ in range(4):
            p.invoke("spam", b"\0" * 3)
    # 12 lines offered within (much less than) a second, the burst holds 5.
    assert len([r for r in caplog.records if "spam spam" in r.getMessage()]) == 5
    p.close()


def test_a_foreign_file_in_the_compile_cache_is_recompiled_never_loaded(tmp_path: Path) -> None:
    data = (FIXTURES / "echo.wat").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    first = Engine(cache_dir=tmp_path / "a")
    try:
        first.compile(data, digest)
        (artifact,) = (tmp_path / "a").glob("*.cwasm")
        assert artifact.read_bytes().startswith(MAGIC)
        native = artifact.read_bytes()
    finally:
        first.close()
    # Another shard with its own key: the same bytes (a valid artifact, but not written with
    # this key) are discarded and the module is compiled again.
    other_dir = tmp_path / "b"
    other = Engine(cache_dir=other_dir)
    try:
        (other_dir / artifact.name).write_bytes(native)
        assert not other.compile(data, digest).from_cache
        assert other.compile(data, digest).from_cache  # its own artifact is trusted
        # A tag over other content: a swapped artifact body fails the check too.
        mine = (other_dir / artifact.name).read_bytes()
        (other_dir / artifact.name).write_bytes(mine[:-1] + bytes([mine[-1] ^ 1]))
        assert not other.compile(data, digest).from_cache
    finally:
        other.close()


def test_interrupt_all_stops_a_guest_with_a_long_deadline() -> None:
    import threading

    engine = Engine(epoch_tick_s=0.001)
    try:
        p = pool(engine, fixture(engine, "runaway"), timeout_s=3600, max_instances=1)
        outcome: list[str] = []

        def run() -> None:
            try:
                p.invoke("spin", b"")
            except DeadlineExceeded:
                outcome.append("stopped")

        t = threading.Thread(target=run)
        t.start()
        ticker = engine._ticker
        # The guest is running once its instance published a deadline an hour away.
        wait_for(
            lambda: ticker._busy_until() >= ticker._epoch + 1_000_000, 60, "the guest running", interval=0.01
        )
        engine.interrupt_all()
        t.join(60)
        assert outcome == ["stopped"]
        p.close()
    finally:
        engine.close()


def test_a_cpu_kernel_stops_inside_the_kernel_at_the_invoke_deadline() -> None:
    from tensorwasm.runtime.accel.base import KernelArg
    from tensorwasm.runtime.accel.cpu import CpuAccelerator
    from tensorwasm.runtime.tenancy.deadline import set_deadline

    accel = CpuAccelerator()
    dev = accel.open_tenant("kernel", None)
    try:
        m = n = k = 512
        a, b, c = (dev.alloc(m * k * 4) for _ in range(3))
        args = [KernelArg("buffer", a), KernelArg("buffer", b), KernelArg("buffer", c)]
        args += [KernelArg("u32", m), KernelArg("u32", n), KernelArg("u32", k)]
        dev.launch("matmul", (1, 1, 1), (1, 1, 1), args)  # no deadline on this thread: runs
        set_deadline(-1.0)  # an invoke whose deadline has passed: the kernel's first step refuses
        try:
            with pytest.raises(DeadlineExceeded, match="inside a host kernel"):
                dev.launch("matmul", (1, 1, 1), (1, 1, 1), args)
        finally:
            set_deadline(None)
    finally:
        accel.close_tenant("kernel")
        accel.close()


def test_an_allocation_the_host_cannot_back_is_refused_and_not_left_counted() -> None:
    from tensorwasm.runtime.accel.cpu import CpuAccelerator
    from tensorwasm.runtime.errors import GpuMemoryExhausted

    accel = CpuAccelerator()
    dev = accel.open_tenant("huge", None)  # accounting only: the cap itself refuses nothing
    try:
        with pytest.raises(GpuMemoryExhausted):
            dev.alloc(1 << 55)  # 32 PiB: numpy cannot allocate it
        assert dev.bytes_in_use() == 0 and dev.usage().bytes_in_use == 0
    finally:
        accel.close_tenant("huge")
        accel.close()
