"""The epoch ticker behind per-invoke deadlines: rounded up (never early), honest with a coarse
tick, parked while idle without letting a running guest escape its deadline, and stopped by
Engine.close()."""

from __future__ import annotations

import threading
import time

import pytest

from tensorwasm.runtime.engine import Engine
from tensorwasm.runtime.errors import BadRequest, DeadlineExceeded, ModuleRejected
from tests.conftest import wait_for
from tests.unit.engine_helpers import fixture, inline, pool

TIMEOUTS_MS = (1, 2, 3, 7, 10, 33, 100, 250, 333, 500, 999, 1000, 1500)


@pytest.mark.parametrize("tick_s", [0.0003, 0.001, 0.005, 0.01])
def test_ticks_never_stop_a_guest_before_its_deadline(tick_s: float) -> None:
    engine = Engine(epoch_tick_s=tick_s)
    try:
        for ms in TIMEOUTS_MS:
            ticks = engine.ticks_for(ms / 1000)
            # Worst case the first tick lands right after the deadline is set: the remaining
            # ticks - 1 must still cover the whole timeout ...
            assert (ticks - 1) * tick_s >= ms / 1000 - 1e-12, (tick_s, ms, ticks)
            # ... and no more than one tick beyond it is added.
            assert (ticks - 2) * tick_s < ms / 1000, (tick_s, ms, ticks)
    finally:
        engine.close()


def test_a_coarse_tick_still_honours_the_deadline() -> None:
    # 50 ms at a 20 ms tick is 2.5 ticks: rounding to nearest (2, +1) could stop it after 40 ms.
    engine = Engine(epoch_tick_s=0.02)
    try:
        p = pool(engine, fixture(engine, "runaway"), timeout_s=0.05, max_instances=1)
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            p.invoke("spin", b"")
        elapsed = time.perf_counter() - started
        # Never early; "stopped at all" is what the upper bound checks (a stuck ticker would let it
        # spin for ever), so it is generous: a busy machine stretches the tail, not the deadline.
        assert 0.05 <= elapsed < 30, elapsed
        assert p.invoke("ok", b"") == b""
        p.close()
    finally:
        engine.close()


def test_close_stops_the_ticker_thread() -> None:
    before = set(threading.enumerate())
    engine = Engine(epoch_tick_s=0.001)
    (ticker,) = [t for t in threading.enumerate() if t not in before and t.name == "wasm-epoch-ticker"]
    assert ticker.is_alive()
    engine.close()
    assert not ticker.is_alive()


def test_an_idle_ticker_parks_and_a_runaway_guest_is_still_stopped() -> None:
    before = set(threading.enumerate())
    engine = Engine(epoch_tick_s=0.001, park_after_s=0.05)
    (ticker,) = [t for t in threading.enumerate() if t not in before and t.name == "wasm-epoch-ticker"]
    try:
        p = pool(engine, fixture(engine, "runaway"), timeout_s=0.3, max_instances=1)
        wait_for(lambda: engine.ticker_parked, 5, "ticker parked while idle")
        # A call longer than park_after_s: the ticker must keep going until its deadline.
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            p.invoke("spin", b"")
        assert 0.3 <= time.perf_counter() - started < 30  # never early; stopped (the bound is generous)
        assert p.invoke("ok", b"") == b""
        wait_for(lambda: engine.ticker_parked, 5, "ticker parked again")
        p.close()
        # A tw_init that spins, started while the ticker is parked, is stopped at its deadline too.
        spinning_init = inline(
            engine, '(func (export "tw_init") (result i32) (loop $l (br $l)) (i32.const 0))'
        )
        with pytest.raises(ModuleRejected, match="tw_init failed: deadline"):
            pool(engine, spinning_init, timeout_s=0.05)
    finally:
        engine.close()
    assert not ticker.is_alive()  # close() wakes a parked ticker so it can exit


def test_park_after_is_checked() -> None:
    with pytest.raises(BadRequest, match="park_after_s"):
        Engine(park_after_s=-1)
