"""Per-tenant GPU byte reservation: layer 1 of the three-layer cap (host counter, driver pool, MPS).

Owns `GpuCap`, the check-and-add that runs before every device allocation. Python has no atomic
compare-and-swap on ints, so the compare and the swap happen under one lock: no two threads can both
see room for the last bytes. Sizes are charged at the pool's granularity, so the counter never reports
less than the driver maps. No limit means accounting only: nothing is refused, everything is counted.
Both backends call `reserve` / `release` on their alloc/free paths: this is the only copy of the counting.
Pure: must not import cuda, numpy or wasmtime.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from tensorwasm.runtime.errors import BadRequest, GpuMemoryExhausted


class GpuCap:
    """Thread-safe byte counter with an optional hard limit, charged in `granularity` steps."""

    __slots__ = ("_current", "_granularity", "_limit", "_lock", "_max", "_peak")

    def __init__(self, limit: int | None, granularity: int = 1) -> None:
        if limit is not None and (type(limit) is not int or limit < 0):
            raise BadRequest(f"GPU memory cap must be a non-negative integer of bytes, got {limit!r}")
        if type(granularity) is not int or granularity <= 0:
            raise BadRequest(f"allocation granularity must be a positive integer, got {granularity!r}")
        self._limit = limit
        # One integer compare on the hot path: "no cap" is a limit nothing can reach.
        self._max = limit if limit is not None else 1 << 80
        self._granularity = granularity
        self._current = 0
        self._peak = 0
        self._lock = threading.Lock()

    @property
    def limit(self) -> int | None:
        return self._limit

    @property
    def granularity(self) -> int:
        return self._granularity

    @property
    def current(self) -> int:
        return self._current

    @property
    def peak(self) -> int:
        """Highest value `current` ever reached (what a sampler would have to beat)."""
        return self._peak

    def charge_for(self, nbytes: int) -> int:
        """Bytes an allocation of `nbytes` costs: rounded up to the granularity."""
        if type(nbytes) is not int or nbytes <= 0:
            raise BadRequest(f"allocation size must be a positive integer of bytes, got {nbytes!r}")
        g = self._granularity
        return -(-nbytes // g) * g

    def reserve(self, nbytes: int) -> int:
        """Charge an allocation of `nbytes`; returns the charged bytes or raises GpuMemoryExhausted.

        Inlined rather than calling `charge_for`: this runs before every device allocation."""
        if nbytes.__class__ is not int or nbytes <= 0:
            self.charge_for(nbytes)  # raises the clear error
        g = self._granularity
        charged = -(-nbytes // g) * g
        lock = self._lock
        lock.acquire()  # explicit acquire/release: half the cost of `with` on this path
        try:
            current = self._current
            new = current + charged
            if new <= self._max:
                self._current = new
                if new > self._peak:
                    self._peak = new
                return charged
        finally:
            lock.release()
        raise GpuMemoryExhausted(requested=charged, limit=self._max, current=current)

    def reserve_all(self, sizes: Iterable[int]) -> list[int]:
        """All-or-nothing charge of several allocations (snapshot restore); returns each charge."""
        charges = [self.charge_for(n) for n in sizes]
        total = sum(charges)
        with self._lock:
            current = self._current
            if current + total <= self._max:
                self._current = current + total
                if self._current > self._peak:
                    self._peak = self._current
                return charges
        raise GpuMemoryExhausted(requested=total, limit=self._max, current=current)

    def release(self, charged: int) -> None:
        """Return bytes charged by `reserve`; returning more than is held is a bug, never clamped."""
        lock = self._lock
        lock.acquire()
        try:
            current = self._current
            if charged.__class__ is int and 0 <= charged <= current:
                self._current = current - charged
                return
        finally:
            lock.release()
        raise BadRequest(f"cannot release {charged!r} bytes: {current} are reserved")
