"""Prewarm: which sleeping tenants to wake ahead of predicted use (spec.idle.prewarm: history).

Owns `ArrivalHistory` (per tenant: which 5-minute slots of each of the last 7 days saw a request;
7 x 288 bits, the 2,016 counters of the design in docs/operator.md, one bit each) and `choose`
(the pure pick of whom to prewarm now). The prediction for a slot is the share of the observed
previous days (at most 7, at least MIN_DAYS) with a request in the same slot of the day; a tenant
is due when that share reaches THRESHOLD for the slot now or the one starting within LEAD_S, so
it is awake before its slot begins. Each tenant is prewarmed at most once per slot: a wrong guess
sleeps again after its idle.after and is not woken again for the same slot. The caller remembers
the last PREWARMED_SLOTS_KEPT slots it prewarmed (not only the last one): two adjacent predicted
slots would otherwise take turns, a wake every idle.after for the whole window.
The room rule is the shard's (runtime/sleep.py `Sleeper.prewarm`: free room only, never an
eviction). Pure and clock-injected; must not import wasmtime, cuda, aiohttp or the snapshot code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

SLOT_S = 300
SLOTS_PER_DAY = 86_400 // SLOT_S
DAYS = 7
MIN_DAYS = 2  # one day of history is a coincidence, not a pattern
THRESHOLD = 0.5  # requests in this slot on at least half of the days seen
LEAD_S = 60.0  # wake this long before a predicted slot begins (a wake from disk takes up to ~0.4 s)
# Slots a tenant was prewarmed for that its sleeper remembers: `due` looks at the slot now and the
# next one, so the last few cover every slot it could pick again.
PREWARMED_SLOTS_KEPT = 4


def slot_of(t: float) -> tuple[int, int]:
    """(day number, slot of that day) of a wall-clock time (UTC days)."""
    day, slot = divmod(int(t // SLOT_S), SLOTS_PER_DAY)
    return day, slot


class ArrivalHistory:
    """Which slots of each of the last DAYS days saw a request; thread-safe, O(1) per request."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._days: dict[int, int] = {}  # day number -> bitmask of its slots with a request
        self._first_day: int | None = None
        self._lock = threading.Lock()

    def record(self, t: float | None = None) -> None:
        day, slot = slot_of(self.clock() if t is None else t)
        with self._lock:
            mask = self._days.get(day)
            if mask is None:  # a new day: forget those past the window
                self._days = {d: m for d, m in self._days.items() if d > day - DAYS}
                mask = 0
            self._days[day] = mask | (1 << slot)
            if self._first_day is None or day < self._first_day:
                self._first_day = day

    def probability(self, t: float) -> float:
        """Share of the observed previous days (at most DAYS) with a request in `t`'s slot of the
        day; 0 with fewer than MIN_DAYS observed."""
        day, slot = slot_of(t)
        with self._lock:
            if self._first_day is None:
                return 0.0
            seen = min(DAYS, day - self._first_day)
            if seen < MIN_DAYS:
                return 0.0
            hits = sum(1 for d in range(day - seen, day) if self._days.get(d, 0) >> slot & 1)
        return hits / seen


@dataclass(frozen=True)
class Candidate:
    """A sleeping tenant with prewarm on, as the shard sees it now."""

    name: str
    history: ArrivalHistory
    prewarmed: Collection[tuple[int, int]] = ()  # the slots it was already prewarmed for (recent ones)


def due(candidate: Candidate, now: float) -> tuple[float, tuple[int, int]] | None:
    """(predicted probability, the slot it is for) when `candidate` should be awake now."""
    for at in (now, now + LEAD_S):
        p = candidate.history.probability(at)
        slot = slot_of(at)
        if p >= THRESHOLD and slot not in candidate.prewarmed:
            return p, slot
    return None


def choose(candidates: Iterable[Candidate], now: float, room: int) -> list[tuple[str, tuple[int, int]]]:
    """Up to `room` (the shard's prewarm budget left) due tenants, most likely first: (name, slot)."""
    scored = [(found, c.name) for c in candidates if (found := due(c, now)) is not None]
    scored.sort(key=lambda item: (-item[0][0], item[1]))
    return [(name, found[1]) for found, name in scored[: max(0, room)]]
