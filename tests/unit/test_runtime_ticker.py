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


class _Runner:
    deadline_epoch = 0


def test_the_epoch_follows_the_clock_and_a_lagging_ticker_costs_no_guest_its_time() -> None:
    # A starved ticker thread wakes late; counting one tick per sleep then ran deadlines 3x late
    # at load 20 on 2 cores. The ticker is made 40 ticks behind the clock here (its origin moved
    # back): a guest starting now is given those 40 ticks on top of its own (its store deadline
    # and its published deadline both), and the next wake-up adds all 40 at once.
    from tensorwasm.runtime.engine.ticker import EpochTicker

    increments: list[int] = []
    tick = 0.05
    ticker = EpochTicker(0, increments.append, tick, park_after_s=3600)
    try:
        runner = _Runner()
        ticker.track(runner)
        ticker._origin -= 40 * tick
        epoch = ticker._epoch
        started = time.monotonic()
        store_ticks = ticker.guest_runs(10_000, runner)
        assert 40 <= store_ticks - 10_000 <= 41 + (ticker._epoch - epoch)
        assert runner.deadline_epoch == epoch + store_ticks + 1
        wait_for(lambda: ticker._epoch >= epoch + 40, 30, "the ticker to catch up with the clock")
        # Caught up, and all the guest's own ticks but those the clock has since run are still ahead.
        spent = (time.monotonic() - started) / tick
        assert ticker.ticks_left(runner) >= 10_000 - spent - 2
        assert len(increments) == ticker._epoch  # one engine increment per tick, none skipped
    finally:
        ticker.close()


def test_a_parked_ticker_resumes_from_its_epoch_not_from_the_time_it_slept() -> None:
    from tensorwasm.runtime.engine.ticker import EpochTicker

    ticker = EpochTicker(0, lambda _ptr: None, 0.001, park_after_s=0.01)
    try:
        wait_for(lambda: ticker.parked, 30, "the idle ticker to park")
        ticker._origin -= 0.2  # as if parked for 200 ticks of clock (no waiting): no guest's time
        runner = _Runner()
        ticker.track(runner)
        epoch = ticker._epoch
        started = time.monotonic()
        assert ticker.guest_runs(1000, runner) == 1000  # parked: nothing behind to make up
        wait_for(lambda: not ticker.parked and ticker._epoch > epoch, 30, "the ticker to resume")
        # Since waking it has counted no more ticks than the clock ran (the 200 parked ones are not
        # made up at once, which would have eaten a fifth of this guest's time).
        assert ticker._epoch - epoch <= (time.monotonic() - started) / 0.001 + 2
    finally:
        ticker.close()
