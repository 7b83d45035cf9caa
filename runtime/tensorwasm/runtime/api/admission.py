"""Admission before a request body is read: the global in-flight body budget and the per-source
limit on failed authentication.

Owns `BodyBudget` (bytes of request bodies buffered or waiting to run, across every connection:
a request that would pass it is refused with 429 before its body is read) and `AuthFailures`
(a token bucket per client address: past its rate, requests from that address get 429 without
their token being looked at). Pure (event-loop side, no locks); must not import wasmtime or cuda.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionLimits:
    """Defaults are documented in docs/runtime.md ("HTTP limits")."""

    inflight_body_bytes: int = 256 << 20
    auth_failures_per_s: float = 20.0  # per client address; bursts up to auth_failure_burst
    auth_failure_burst: int = 100
    tracked_sources: int = 10_000  # addresses remembered (least recently failed dropped first)


class BodyBudget:
    """Bytes of request bodies admitted and not yet released (event-loop thread only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            self.refused += 1
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes


class AuthFailures:
    """Failed authentications per client address, as token buckets (event-loop thread only)."""

    def __init__(self, per_s: float, burst: int, tracked: int) -> None:
        self.per_s, self.burst, self.tracked = per_s, float(burst), tracked
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, stamp)
        self.limited = 0

    def blocked(self, source: str) -> float:
        """Seconds until `source` may try again (0.0: not limited)."""
        entry = self._buckets.get(source)
        if entry is None:
            return 0.0
        tokens = min(self.burst, entry[0] + (time.monotonic() - entry[1]) * self.per_s)
        if tokens >= 1:
            return 0.0
        self.limited += 1
        return (1 - tokens) / self.per_s

    def failed(self, source: str) -> None:
        now = time.monotonic()
        tokens, stamp = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.per_s) - 1
        self._buckets[source] = (tokens, now)
        while len(self._buckets) > self.tracked:
            self._buckets.popitem(last=False)
