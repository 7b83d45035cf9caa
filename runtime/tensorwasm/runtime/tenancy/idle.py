"""Who may hold the shard's GPU while others sleep: the residency budget and its LRU eviction.

Owns `Residency`: a thread-safe ledger of the GPU bytes each resident (awake) tenant may use (its
cap: what layers 1 and 2 let it allocate), bounded by the shard's resident budget, and the one rule
for making room: when a load or a wake would exceed the budget, the least recently used residents
with nothing in flight are put to sleep first, oldest first, until the newcomer fits. A tenant with
requests in flight (running or queued) is never chosen, nor one whose idle.after is `never`; when
nobody can be chosen the newcomer waits for one (bounded by its deadline), then is refused with 429
+ Retry-After. A prewarm (`try_admit`) takes free room only: it never puts anyone to sleep.
A victim that stayed idle but did not sleep (its capture failed: disk full, store error) is not
chosen again for FAILED_VICTIM_SKIP_S: the newcomer looks for others, else waits as for busy ones,
instead of capturing the same victim back to back until its deadline.
The invariant every test checks: bytes reserved <= budget at every moment, and a tenant's device is
opened only after its reservation and closed before the reservation is given back, so the sum of
the caps of open devices (hence of their allocations) never exceeds the budget.
Pure policy plus a lock: sleeping itself is the `Resident`'s (runtime/sleep.py). Must not import
wasmtime, cuda, aiohttp or the snapshot code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from tensorwasm.runtime import metrics
from tensorwasm.runtime.errors import GpuMemoryExhausted, Overloaded

# How often a newcomer that found every resident busy looks again (a busy one may finish any time).
_RECHECK_S = 0.02
# A victim whose sleep failed is skipped this long (its own backoff refuses captures meanwhile too).
FAILED_VICTIM_SKIP_S = 5.0


class Resident(Protocol):
    """What the ledger needs of a resident tenant to choose and evict it."""

    name: str
    pinned: bool  # idle.after is never: it stays resident, never evicted

    def last_used(self) -> float: ...
    def busy(self) -> bool: ...
    def try_sleep(self, reason: str) -> bool:
        """Capture and release (giving its reservation back); False when it is busy or cannot."""
        ...


class Residency:
    """GPU bytes reserved by resident tenants, at most `budget_bytes` (None: no budget, only counted)."""

    def __init__(self, budget_bytes: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget_bytes
        self._clock = clock
        self._held: dict[str, int] = {}
        self._members: dict[str, Resident] = {}
        self._evicting: set[str] = set()
        self._failed: dict[str, float] = {}  # victim -> clock() until which it is not chosen again
        self._cond = threading.Condition()
        self.peak = 0  # the most ever reserved at once (benchmarks and the wake-storm test read it)
        self._publish()

    @property
    def used(self) -> int:
        return sum(self._held.values())

    def holds(self, name: str) -> bool:
        with self._cond:
            return name in self._held

    def admit(self, name: str, need: int, timeout_s: float) -> None:
        """Reserve `need` bytes for `name`, putting LRU idle residents to sleep to make room.

        Raises GpuMemoryExhausted when `need` alone is over the budget, Overloaded (429) when every
        resident stayed busy until the deadline. Re-admitting a holder replaces its reservation."""
        if self.budget is not None and need > self.budget:
            raise GpuMemoryExhausted(need, self.budget, 0)  # never fits, even alone
        deadline = self._clock() + timeout_s
        while True:
            with self._cond:
                self._held.pop(name, None)
                used = self.used
                if self.budget is None or used + need <= self.budget:
                    self._held[name] = need
                    self.peak = max(self.peak, used + need)
                    self._publish()
                    return
                victims = self._choose(name, used + need - self.budget)
                self._evicting.update(v.name for v in victims)
                if not victims:
                    left = deadline - self._clock()
                    if left <= 0:
                        raise Overloaded(
                            f"no GPU room to wake tenant {name}: the resident tenants are busy "
                            f"({used} of {self.budget} bytes reserved)", retry_after_s=1.0,
                        )  # fmt: skip
                    self._cond.wait(min(left, _RECHECK_S))
                    continue
            for victim in victims:
                slept = False
                try:
                    slept = victim.try_sleep("evicted")
                finally:
                    with self._cond:
                        self._evicting.discard(victim.name)
                        if not slept and not victim.busy() and victim.name in self._members:
                            # Idle and still resident: its capture failed (or backs off). Busy ones
                            # are skipped by _choose anyway, and may well be free again soon.
                            self._failed[victim.name] = self._clock() + FAILED_VICTIM_SKIP_S

    def try_admit(self, name: str, need: int) -> bool:
        """Reserve `need` bytes for `name` only if they fit beside what is reserved now: never puts
        anyone to sleep (a prewarm is a guess; runtime/sleep.py `Sleeper.prewarm`)."""
        with self._cond:
            if name in self._held:
                return False
            used = self.used
            if self.budget is not None and used + need > self.budget:
                return False
            self._held[name] = need
            self.peak = max(self.peak, used + need)
            self._publish()
            return True

    def _choose(self, newcomer: str, short: int) -> list[Resident]:
        """Least recently used idle residents whose reservations cover `short` bytes (lock held)."""
        now = self._clock()
        self._failed = {n: until for n, until in self._failed.items() if until > now and n in self._members}
        candidates = sorted(
            (
                m
                for n, m in self._members.items()
                if n != newcomer
                and n not in self._evicting
                and n not in self._failed
                and not m.pinned
                and not m.busy()
            ),
            key=lambda m: m.last_used(),
        )
        chosen, freed = [], 0
        for m in candidates:
            if freed >= short:
                break
            chosen.append(m)
            freed += self._held.get(m.name, 0)
        return chosen  # partial room still helps: the caller looks again after these sleep

    def attach(self, name: str, member: Resident) -> None:
        """Make a holder evictable (once it serves)."""
        with self._cond:
            if name in self._held:
                self._members[name] = member

    def release(self, name: str) -> None:
        """Give back `name`'s reservation (after its device closed)."""
        with self._cond:
            self._held.pop(name, None)
            self._members.pop(name, None)
            self._publish()
            self._cond.notify_all()

    def _publish(self) -> None:
        metrics.RESIDENT_GPU_BYTES.labels("reserved").set(self.used)
        metrics.RESIDENT_GPU_BYTES.labels("budget").set(self.budget if self.budget is not None else 0)
