"""Per-tenant request rate limits: a token bucket per tenant from its spec.rateLimit.

Owns `RequestRates`: one bucket per tenant (every token of the tenant shares it, so adding tokens
never raises the rate), refilled at `requestsPerSecond` up to `burst` (default one second's worth).
`take` answers 0.0 (admitted) or the seconds until one token is back, which the HTTP layer sends as
Retry-After; a refused request takes nothing. A changed spec starts a full bucket. Pure (event-loop
thread only, no locks); must not import wasmtime, cuda or aiohttp.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tensorwasm.api.tenant import RateLimit


class _Bucket:
    __slots__ = ("capacity", "rate", "spec", "stamp", "tokens")

    def __init__(self, spec: RateLimit, rate: int, now: float) -> None:
        self.spec = spec
        self.rate = float(rate)
        self.capacity = float(spec.burst if spec.burst is not None else rate)
        self.tokens = self.capacity
        self.stamp = now


class RequestRates:
    """Token buckets of every tenant of a shard (event-loop thread only)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._clock = clock

    def take(self, tenant: str, spec: RateLimit) -> float:
        """Admit one request of `tenant` (0.0) or say how many seconds until it would be."""
        rate = spec.requests_per_second
        if rate is None:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None or bucket.spec != spec:
            bucket = self._buckets[tenant] = _Bucket(spec, rate, now)
        tokens = min(bucket.capacity, bucket.tokens + (now - bucket.stamp) * bucket.rate)
        bucket.stamp = now
        if tokens >= 1.0:
            bucket.tokens = tokens - 1.0
            return 0.0
        bucket.tokens = tokens
        return (1.0 - tokens) / bucket.rate

    def forget_except(self, tenants: set[str]) -> None:
        """Drop the buckets of tenants no longer served (bounded memory)."""
        for name in [n for n in self._buckets if n not in tenants]:
            del self._buckets[name]

    def __len__(self) -> int:
        return len(self._buckets)
