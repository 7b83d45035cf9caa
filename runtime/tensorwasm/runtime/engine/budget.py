"""Per-tenant rate budgets for what a guest does through the host: host calls and log bytes.

Owns `TenantBudget`: two token buckets shared by every instance of one tenant (refilled at the
tenant's per-second rates, holding at most one second's worth). A host call over the call rate
waits for its token *inside the call*, so the time is charged to that invoke's own deadline (the
epoch keeps ticking while it waits, and the guest is interrupted when it resumes past it); a log
line over the byte rate is dropped and counted. Per-invoke caps live on the instance's context.
Pure (time and a lock only); must not import wasmtime, the accelerator or the HTTP layer.
"""

from __future__ import annotations

import threading
import time

# A host call never waits longer than this at once: the guest resumes, and the epoch check that
# follows stops it if its deadline passed meanwhile.
MAX_WAIT_S = 0.01


class _Bucket:
    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.capacity = float(rate)  # one second's worth of burst
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self, n: float, now: float) -> float:
        """Take `n` tokens; returns 0.0, or how long until they would have been there (taken anyway)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def try_take(self, n: float, now: float) -> bool:
        """Take `n` tokens only if they are all there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


class TenantBudget:
    """Host-call and log-byte rates of one tenant; thread-safe (its workers share it)."""

    def __init__(self, host_calls_per_s: int, log_bytes_per_s: int) -> None:
        self._calls = _Bucket(host_calls_per_s)
        self._log = _Bucket(max(log_bytes_per_s, 1))
        self._log_off = log_bytes_per_s == 0
        self._lock = threading.Lock()
        self.waited_s = 0.0  # total time host calls spent waiting for tokens (tests, bench)

    def host_call(self, tokens: float = 1.0) -> None:
        """Charge a host call (`tokens` of the rate); sleeps (GIL released) while over the rate."""
        with self._lock:
            wait = self._calls.take(tokens, time.monotonic())
        if wait:
            wait = min(wait, MAX_WAIT_S)
            self.waited_s += wait
            time.sleep(wait)

    def log_allowed(self, nbytes: int) -> bool:
        """Whether a log line of `nbytes` fits the per-second byte rate (taken if it does)."""
        if self._log_off:
            return False
        with self._lock:
            return self._log.try_take(float(nbytes), time.monotonic())
