"""Engine limits: deadlines (epoch), memory caps (store limits), traps; the pool survives each."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tensorwasm.runtime import metrics
from tensorwasm.runtime.engine import Engine
from tensorwasm.runtime.errors import DeadlineExceeded, GuestMemoryExceeded, GuestTrap
from tests.conftest import wait_for
from tests.unit.engine_helpers import fixture, in_thread, inline, inside, pool


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    e = Engine()
    yield e
    e.close()


def _spawns() -> float:
    return float(metrics.INSTANCE_SPAWNS.labels(tenant="test")._value.get())


def test_runaway_loop_is_stopped_at_the_deadline(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "runaway"), timeout_s=0.2, max_instances=2)
    before = _spawns()
    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded, match="deadline"):
        p.invoke("spin", b"")
    elapsed = time.perf_counter() - started
    assert 0.19 <= elapsed < 30, elapsed  # never early; stopped at all (generous: a busy machine)
    assert _spawns() == before + 1  # the interrupted instance was discarded and replaced
    for _ in range(3):  # every pooled instance is usable
        assert p.invoke("ok", b"") == b""


def test_per_invoke_timeout_overrides_the_tenant_default(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "runaway"), timeout_s=5.0)
    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        p.invoke("spin", b"", timeout_s=0.05)
    assert time.perf_counter() - started < 4  # the 0.05 s override, not the tenant's 5 s default


def test_memory_bomb_hits_the_linear_memory_cap(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "memory_bomb"), memory_bytes=8 << 20)
    with pytest.raises(GuestMemoryExceeded, match="8388608 byte limit") as err:
        p.invoke("bomb", b"")
    assert err.value.status == 507
    assert p.invoke("ok", b"") == b""


def test_input_larger_than_the_memory_cap_is_refused(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "echo"), memory_bytes=1 << 20)
    with pytest.raises(GuestMemoryExceeded, match="could not allocate"):
        p.invoke("echo", b"x" * (2 << 20))
    assert p.invoke("echo", b"small") == b"small"


def test_deep_recursion_is_a_stack_overflow_trap(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "recursion"))
    with pytest.raises(GuestTrap, match="stack overflow") as err:
        p.invoke("recurse", b"")
    assert err.value.details == {"trap": "stack_overflow"}
    assert p.invoke("ok", b"") == b""


def test_output_outside_linear_memory_is_a_trap(engine: Engine) -> None:
    m = inline(
        engine, '(func (export "liar") (param i32 i32) (result i64) (i64.const 0x0000_FFF0_0000_0100))'
    )
    with pytest.raises(GuestTrap, match="outside linear memory"):
        pool(engine, m).invoke("liar", b"")


def test_guest_failure_without_host_error_is_a_trap(engine: Engine) -> None:
    m = inline(engine, '(func (export "fails") (param i32 i32) (result i64) (i64.const -1))')
    with pytest.raises(GuestTrap, match="reported failure"):
        pool(engine, m).invoke("fails", b"")


@pytest.fixture
def own_engine() -> Iterator[Engine]:
    """An engine of the test's own, so it can interrupt its spinning guest (one-way) when done."""
    e = Engine()
    yield e
    e.interrupt_all()
    e.close()


def test_a_spinning_guest_does_not_block_other_instances(own_engine: Engine) -> None:
    spin = pool(own_engine, fixture(own_engine, "runaway"), timeout_s=600)
    echo = pool(own_engine, fixture(own_engine, "echo"))
    done: list[str] = []
    t = in_thread(lambda: spin.invoke("spin", b""), done, "spin")
    wait_for(lambda: inside(t, "call"), 60, "the spinner running guest code", interval=0.005)
    for _ in range(100):
        assert echo.invoke("echo", b"still here") == b"still here"
    # Not serialized behind the spinning guest: it is still spinning (a ten-minute deadline).
    assert t.is_alive() and done == []
    own_engine.interrupt_all()
    t.join(60)
    assert done == ["spin:deadline_exceeded"]


def test_no_free_instance_within_the_deadline(own_engine: Engine) -> None:
    p = pool(own_engine, fixture(own_engine, "runaway"), timeout_s=600, max_instances=1)
    done: list[str] = []
    t = in_thread(lambda: p.invoke("spin", b""), done, "spin")
    wait_for(lambda: inside(t, "call"), 60, "the spinner holding the only instance", interval=0.005)
    with pytest.raises(DeadlineExceeded, match="no warm instance"):
        p.invoke("ok", b"", timeout_s=0.05)
    own_engine.interrupt_all()
    t.join(60)
    assert done == ["spin:deadline_exceeded"]
    assert p.invoke("ok", b"") == b""
