"""The epoch ticker: the clock behind every guest deadline of one wasmtime Engine.

Owns the thread that advances the engine's epoch every `tick_s`, its parking while no guest code can
be running (an idle shard costs no wake-ups), the runners it must keep ticking for, and
`interrupt_all`, which fast-forwards the epoch past every deadline so that no guest outlives a
shutdown. Each runner's real deadline is the epoch it publishes in `guest_runs`; a watched store's
own epoch deadline is at most `slice_ticks` ahead, and its callback (deadlines.py) asks `ticks_left`
whether to go on. Must not import wasmtime (it is handed the engine pointer and lowlevel's increment).
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

# Shutdown catch-up: at least this many ticks per burst (about 2.5 ms at 0.6 us a tick; the
# interpreter still hands the GIL over every switch interval), at most this many pauses between
# bursts (each may cost a whole time slice on a CPU shared with a spinning guest), each this long.
# 600,000 ticks (the longest timeoutMs at 1 ms ticks) pass in about half a second.
_CATCH_UP_BATCH = 4096
_CATCH_UP_PAUSES = 8
_CATCH_UP_PAUSE_S = 0.0005
# A watched store's epoch deadline is at most this far ahead: how soon a cancelled guest that never
# calls the host notices (deadlines.py); each slice a long guest runs costs one callback (~10 us).
SLICE_S = 0.05


class EpochTicker:
    """One per Engine; `guest_runs` is the hot path (no lock), everything else is rare."""

    def __init__(
        self,
        engine_ptr: int,
        increment: Callable[[int], None],
        tick_s: float,
        park_after_s: float,
    ) -> None:
        self.tick_s = tick_s
        self._ptr, self._increment = engine_ptr, increment
        # Park once every deadline set so far has passed, plus this many ticks: steady light
        # traffic never pays a wake-up, an idle shard stops waking 1,000 times a second.
        self._linger_ticks = math.ceil(park_after_s / tick_s)
        self.slice_ticks = max(1, math.ceil(round(SLICE_S / tick_s, 6)))
        self._epoch = 0  # ticks so far (the engine's epoch, as this thread last advanced it)
        # The epoch follows the clock, not the count of sleeps: on a starved CPU each sleep of one
        # tick lasts several (deadlines ran 3x late at load 20 on 2 cores), so each wake-up adds
        # every whole tick since `_origin` (re-based when the ticker unparks: parked time is no
        # guest's time).
        self._origin = time.monotonic()
        # Every instance that may run guest code, each with the epoch its last deadline falls at:
        # read only when the ticker is about to park, so the hot path takes no lock.
        self._runners: weakref.WeakSet[Any] = weakref.WeakSet()
        self._runners_lock = threading.Lock()
        self._parked = False
        self._unpark = threading.Event()
        self._closed = False
        self._fast_forward = False
        self._thread = threading.Thread(target=self._tick, name="wasm-epoch-ticker", daemon=True)
        self._thread.start()

    def ticks_for(self, timeout_s: float) -> int:
        """Epoch ticks for a deadline, never early: rounded up, +1 because the tick running when the
        deadline is set may be nearly over. The epoch counts whole ticks of the clock (never ahead of
        it) and guest_runs adds what the ticker is behind, so a guest is stopped no sooner than
        `timeout_s` and about two ticks later, plus what the ticker thread waits for a CPU."""
        return max(1, math.ceil(round(timeout_s / self.tick_s, 6))) + 1

    def track(self, runner: Any) -> None:
        """Register an instance that will run guest code (it gets a `deadline_epoch` attribute)."""
        runner.deadline_epoch = 0
        with self._runners_lock:
            self._runners.add(runner)

    def guest_runs(self, ticks: int, runner: Any) -> int:
        """Hot path: `runner` (tracked) is about to run guest code with a deadline `ticks` from now;
        returns the ticks to set as its store's epoch deadline (more than `ticks` when the ticker is
        behind the clock: the catch-up must not eat this guest's time).

        Call before setting the deadline. The runner publishes its deadline, then reads the ticker's
        flag; the ticker publishes the flag, then reads every deadline before it parks: either this
        sees it parked and wakes it, or it sees the deadline and keeps ticking. No lock: a runner is
        used by one thread at a time.
        """
        epoch = self._epoch
        if self._parked:
            runner.deadline_epoch = epoch + ticks + 1
            self._unpark.set()
            return ticks
        now = int((time.monotonic() - self._origin) / self.tick_s)
        behind = now - epoch if now > epoch else 0
        runner.deadline_epoch = epoch + behind + ticks + 1
        if self._parked:  # parked meanwhile: wake it (it re-bases on the epoch it stopped at)
            self._unpark.set()
        return ticks + behind

    def ticks_left(self, runner: Any) -> int:
        """Ticks until `runner`'s deadline (0 or less: passed). Read on the runner's own thread by its
        store's deadline callback; during interrupt_all the published epoch is already past every
        deadline, so every guest is told to stop."""
        left: int = runner.deadline_epoch - self._epoch
        return left

    @property
    def parked(self) -> bool:
        return self._parked

    def interrupt_all(self) -> None:
        """Shutdown: advance the epoch past every deadline set so far, in short bursts with real
        pauses between them, then keep ticking without parking, so every guest running now (and
        any started later) is interrupted within moments whatever its deadline. One-way: the
        engine is about to close."""
        self._fast_forward = True
        self._unpark.set()

    def close(self) -> None:
        self._closed = True
        self._unpark.set()
        self._thread.join(timeout=max(1.0, 2 * self.tick_s))

    def _busy_until(self) -> int:
        """The latest deadline any tracked runner has set (the ticker must reach it)."""
        with self._runners_lock:
            runners = list(self._runners)
        return max((r.deadline_epoch for r in runners), default=0)

    def _tick(self) -> None:
        # time.sleep, not Event.wait: per tick this thread takes the GIL for one flag test and one
        # C call (Event.wait runs a Python Condition each time), so it seldom makes the event loop
        # wait, and it seldom gets preempted while holding the GIL on a busy machine.
        ptr, tick, sleep, increment, linger = (
            self._ptr,
            self.tick_s,
            time.sleep,
            self._increment,
            self._linger_ticks,
        )
        epoch, check_at = 0, linger
        while not self._closed:
            if self._fast_forward:
                # Just past every deadline set so far, then one tick at a time (guests started later
                # are caught up at the next tick). Never an endless spin: a thread that only yields
                # keeps its CPU under SCHED_RR or on a loaded core, and the event loop it shares
                # the GIL with could not finish the shutdown (seen: 25 s in bench_http's pinned run).
                target = self._busy_until() + 1
                while epoch < target and not self._closed:
                    n = min(max(_CATCH_UP_BATCH, -(-(target - epoch) // _CATCH_UP_PAUSES)), target - epoch)
                    epoch += n
                    # Published before the burst: a guest starting meanwhile over-counts its deadline
                    # (harmless, the next look catches up to it), never under-counts it.
                    self._epoch = epoch
                    for _ in range(n):
                        increment(ptr)
                    sleep(_CATCH_UP_PAUSE_S)  # blocks: interrupted guests and the loop take the GIL
                sleep(tick)
                continue
            sleep(tick)
            due = int((time.monotonic() - self._origin) / tick)
            n = due - epoch if due > epoch else 0
            if n > _CATCH_UP_BATCH:  # a long stall (a stopped process): the rest on the next turns
                n = _CATCH_UP_BATCH
            for _ in range(n):
                increment(ptr)
            epoch += n
            self._epoch = epoch
            if epoch < check_at:
                continue
            # Deadlines are read at most once per linger: calls meanwhile move the next look.
            check_at = self._busy_until() + linger
            if epoch <= check_at:
                continue
            self._parked = True
            if epoch > self._busy_until() + linger and not self._closed and not self._fast_forward:
                self._unpark.wait()
            self._unpark.clear()
            self._origin = time.monotonic() - epoch * tick  # the clock resumes where the epoch stopped
            self._parked = False
