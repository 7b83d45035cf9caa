"""How many of n independent sleepers are awake at once: the room the binomial tail asks for.

Owns `awake_at_once` and the swap tolerance it is sized by, shared by the capacity model
(tensorwasm.planner.model: a host's room) and shard admission (tensorwasm.planner.admission: a
shard's room). Pure maths; imports nothing of the project, so both can import it.
"""

from __future__ import annotations

import functools
import math

# A wake that finds the resident budget full puts an awake tenant to sleep on its own path (a capture
# before the restore); one that comes back within its burst pays another wake. The model sizes the
# room so that at most this share of wakes finds it full.
SWAP_TOLERANCE = 0.01


def awake_at_once(tenants: float, active_fraction: float, tolerance: float = SWAP_TOLERANCE) -> int:
    """Room, in tenants, for `tenants` each awake `active_fraction` of the time independently of the
    others: the smallest k for which a waking tenant finds k others awake at most `tolerance` of the
    time, P(Binomial(tenants - 1, active_fraction) >= k) <= tolerance. Not the mean ceil(n * f): at
    8 of room and 10% active the mean fills it at 80 tenants, where bench_sleep.py's independent
    tenants (sleep_activity.py, the runtime's own ledger) saw 80% of wakes evict; the tail says 32."""
    n = math.ceil(round(tenants, 9))
    if n <= 1 or active_fraction >= 1:
        return max(n, 0)
    return _awake_at_once(n, float(active_fraction), float(tolerance))


@functools.lru_cache(maxsize=4096)
def _awake_at_once(n: int, p: float, tolerance: float) -> int:
    low, high = 1, n  # P(Bin(n - 1, p) >= n) = 0: n always suffices
    while low < high:
        mid = (low + high) // 2
        if _at_least(n - 1, p, mid) <= tolerance:
            high = mid
        else:
            low = mid + 1
    return low


def _at_least(n: int, p: float, k: int) -> float:
    """P(Binomial(n, p) >= k), summed from the pmf at k outward (the terms fall off within a few
    standard deviations, so this costs O(sqrt(n)) however large n is)."""
    if k <= 0 or p >= 1:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    if k > n * p:
        return _sum_pmf(n, p, k, +1)
    return 1.0 - _sum_pmf(n, p, k - 1, -1)


def _sum_pmf(n: int, p: float, start: int, step: int) -> float:
    log_pmf = (math.lgamma(n + 1) - math.lgamma(start + 1) - math.lgamma(n - start + 1)
               + start * math.log(p) + (n - start) * math.log1p(-p))  # fmt: skip
    term, total, i = math.exp(log_pmf), 0.0, start
    odds = p / (1 - p)
    while 0 <= i <= n:
        total += term
        if term <= total * 1e-16:
            break
        term *= (n - i) / (i + 1) * odds if step > 0 else i / (n - i + 1) / odds
        i += step
    return min(1.0, total)
