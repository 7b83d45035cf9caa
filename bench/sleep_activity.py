"""Independent tenant activity for bench_sleep.py, and its replay through the shard's real ledger.

Owns the activity process the density and swap-onset cases draw their requests from, and `replay`,
which feeds such a trace to `tensorwasm.runtime.tenancy.idle.Residency` (the shard's resident budget
and its LRU eviction) on a virtual clock. Nothing here uses the planner: the number of tenants awake
at a moment is whatever n independent processes make it, so the onset measured from it can disagree
with the planner's. Must not import tensorwasm.planner, wasmtime or the HTTP server.

The process, per tenant, seeded: a burst of requests (a geometric count, mean BURST_REQUESTS, spaced
by exponential gaps at RATE_PER_S), then a quiet gap (exponential, from the burst's last request to
the next burst's first). The tenant is awake from a burst's first request until the shard's idle
scan finds it idle.after past its last one (the scan runs every idle.after / 4, as shard.py's), so a
tenant's awake share counts its idle tail: the quiet gap's mean is solved so that this share is the
asked active fraction f (`gap_mean_s`), and `replay(..., budget=None)` measures it.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

BURST_REQUESTS = 20.0  # mean requests per burst
RATE_PER_S = 10.0  # requests a second within a burst


@dataclass(frozen=True)
class Activity:
    """The per-tenant process: active share `fraction` of the time, idle.after `idle_after_s`."""

    fraction: float
    idle_after_s: float
    burst_requests: float = BURST_REQUESTS
    rate_per_s: float = RATE_PER_S

    def requests_per_s(self) -> float:
        """Mean requests a second of one tenant: a burst's requests per cycle (burst span + gap)."""
        span = (self.burst_requests - 1) / self.rate_per_s
        return self.burst_requests / (span + self.gap_mean_s())

    @property
    def scan_s(self) -> float:
        return self.idle_after_s / 4  # runtime/shard.py _idle_scan: a quarter of the shortest idle.after

    @property
    def tail_s(self) -> float:
        """Mean time from a tenant's last request to its sleep: idle.after plus half a scan period."""
        return self.idle_after_s + self.scan_s / 2

    def gap_mean_s(self) -> float:
        """The quiet gap's mean g for which the awake share is `fraction`: with span s (first to last
        request of a burst) and tail c, awake per cycle = s + E[min(G, c)] = s + g (1 - e^(-c/g)),
        the cycle s + g; bisected, since the share falls as g grows."""
        span, c = (self.burst_requests - 1) / self.rate_per_s, self.tail_s

        def share(g: float) -> float:
            return (span + g * (1 - math.exp(-c / g))) / (span + g)

        if not 0 < self.fraction < 1 or share(1e6) > self.fraction:
            raise ValueError(f"no quiet gap gives an awake share of {self.fraction}")
        low, high = 1e-6, 1e6
        for _ in range(200):
            mid = math.sqrt(low * high)
            low, high = (mid, high) if share(mid) > self.fraction else (low, mid)
        return high


@dataclass(frozen=True)
class Request:
    at: float  # seconds from the trace's start
    tenant: int
    burst_end: float  # the time of the last request of this request's burst


def trace(n: int, activity: Activity, seconds: float, seed: int) -> list[Request]:
    """Every request of `n` independent tenants over `seconds`, in time order. Each tenant starts at
    a random point of its cycle (busy with the probability of its share of the cycle, else part way
    through a quiet gap: both are memoryless), so the trace is stationary from t = 0."""
    gap = activity.gap_mean_s()
    span = (activity.burst_requests - 1) / activity.rate_per_s
    out: list[Request] = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        t = rng.expovariate(1 / gap) if rng.random() > span / (span + gap) else 0.0
        while t < seconds:
            times = [t]
            while rng.random() > 1 / activity.burst_requests:  # geometric count, mean burst_requests
                times.append(times[-1] + rng.expovariate(activity.rate_per_s))
            end = times[-1]
            out.extend(Request(at, i, end) for at in times if at < seconds)
            t = end + rng.expovariate(1 / gap)
    out.sort(key=lambda r: (r.at, r.tenant))
    return out


@dataclass
class Replay:
    """What the ledger did with one trace."""

    tenants: int
    requests: int = 0
    wakes: int = 0  # requests that found their tenant asleep (each one a wake on its path)
    evictions: int = 0  # awake tenants the ledger put to sleep to make room for a wake
    evictions_in_use: int = 0  # ... while their burst was still running: they wake again in it
    rewakes: int = 0  # wakes of a tenant evicted earlier in the same burst (the swapping's cost)
    awake_seconds: float = 0.0  # summed over tenants
    seconds: float = 0.0
    budget_tenants: int | None = None
    peak_reserved: int = 0
    wake_evicted: list[bool] = field(default_factory=list)  # per wake: did it put anyone to sleep

    @property
    def awake_share(self) -> float:
        return self.awake_seconds / (self.tenants * self.seconds) if self.seconds else 0.0

    @property
    def evicting_wake_share(self) -> float:
        """Share of wakes that had to put an awake tenant to sleep first (the room was full)."""
        return sum(self.wake_evicted) / self.wakes if self.wakes else 0.0


class _Member:
    """A tenant as the ledger sees it (the `Resident` protocol) on the replay's virtual clock."""

    def __init__(self, name: str, replay: Replay, ledger: object) -> None:
        self.name, self.pinned = name, False
        self._replay, self._ledger = replay, ledger
        self.used = 0.0
        self.woke_at = 0.0
        self.burst_end = -1.0
        self.evicted_in: float | None = None  # burst_end of the burst it was evicted in
        self.awake = False
        self.now = lambda: 0.0

    def last_used(self) -> float:
        return self.used

    def busy(self) -> bool:
        return False  # a request takes no virtual time: nothing is in flight when a wake looks

    def try_sleep(self, reason: str) -> bool:
        now = self.now()
        self._replay.evictions += 1
        self._replay.awake_seconds += now - self.woke_at
        self._replay.wake_evicted[-1] = True
        if now < self.burst_end:
            self._replay.evictions_in_use += 1
            self.evicted_in = self.burst_end
        self.awake = False
        self._ledger.release(self.name)  # type: ignore[attr-defined]
        return True


def replay(requests: list[Request], n: int, activity: Activity, seconds: float, cap: int,
           budget: int | None) -> Replay:  # fmt: skip
    """Feed `requests` to a real `Residency(budget)` on a virtual clock: a request to a sleeping
    tenant admits its `cap` (the ledger evicts LRU idle residents when the room is full); the idle
    scan puts a tenant to sleep at its first tick idle.after past its last request."""
    from tensorwasm.runtime.tenancy.idle import Residency

    clock = [0.0]
    ledger = Residency(budget, clock=lambda: clock[0])
    out = Replay(tenants=n, seconds=seconds, budget_tenants=None if budget is None else budget // cap)
    members = [_Member(f"t{i}", out, ledger) for i in range(n)]
    for m in members:
        m.now = lambda: clock[0]
    # (scan tick that finds it idle, tenant): one entry per awake tenant, moved on when it was used
    # again meanwhile, instead of one per request.
    idle: list[tuple[float, int]] = []

    def asleep_at(used: float) -> float:
        return math.ceil((used + activity.idle_after_s) / activity.scan_s) * activity.scan_s

    def sleep_idle(until: float) -> None:
        while idle and idle[0][0] <= until:
            tick, i = heapq.heappop(idle)
            m = members[i]
            if not m.awake:
                continue
            due = asleep_at(m.used)
            if due > tick:
                heapq.heappush(idle, (due, i))
                continue
            m.awake = False
            out.awake_seconds += tick - m.woke_at
            ledger.release(m.name)

    for r in requests:
        if idle and idle[0][0] <= r.at:
            sleep_idle(r.at)
        m = members[r.tenant]
        out.requests += 1
        if not m.awake:
            clock[0] = r.at
            out.wakes += 1
            out.wake_evicted.append(False)
            if m.evicted_in is not None and m.evicted_in == r.burst_end:
                out.rewakes += 1
            m.evicted_in = None
            ledger.admit(m.name, cap, 1.0)
            ledger.attach(m.name, m)
            m.woke_at = r.at
            m.awake = True
            heapq.heappush(idle, (asleep_at(r.at), r.tenant))
        m.used, m.burst_end = r.at, r.burst_end
    sleep_idle(seconds)
    for m in members:
        if m.awake:
            out.awake_seconds += seconds - m.woke_at
    out.peak_reserved = ledger.peak
    return out


def demand(requests: list[Request], activity: Activity, seconds: float, room: int) -> tuple[float, float]:
    """With no budget at all: the share of the time more than `room` tenants are awake (what the
    budget has to hold; the planner's quantity), and the mean number awake."""
    events: list[tuple[float, int]] = []
    last: dict[int, float] = {}
    for r in requests:
        tail_end = _asleep_at(last[r.tenant], activity) if r.tenant in last else -1.0
        if r.tenant not in last or r.at >= tail_end:
            if r.tenant in last:
                events.append((tail_end, -1))
            events.append((r.at, 1))
        last[r.tenant] = r.at
    for t in last.values():
        events.append((min(seconds, _asleep_at(t, activity)), -1))
    events.sort()
    awake, since, over, area = 0, 0.0, 0.0, 0.0
    for at, delta in events:
        if awake > room:
            over += at - since
        area += awake * (at - since)
        awake += delta
        since = at
    return over / seconds, area / seconds


def _asleep_at(last: float, activity: Activity) -> float:
    return math.ceil((last + activity.idle_after_s) / activity.scan_s) * activity.scan_s


def scan(counts: Iterator[int] | list[int], activity: Activity, seconds: float, seeds: tuple[int, ...],
         cap: int, room: int) -> dict[int, dict[str, float]]:  # fmt: skip
    """For each tenant count: the ledger's evicting-wake share, rewakes, the over-budget time share
    and the awake share (no budget), pooled over `seeds`."""
    found: dict[int, dict[str, float]] = {}
    for n in counts:
        wakes = evicting = rewakes = requests = 0
        over = awake = 0.0
        for seed in seeds:
            reqs = trace(n, activity, seconds, seed)
            got = replay(reqs, n, activity, seconds, cap, room * cap)
            wakes += got.wakes
            evicting += sum(got.wake_evicted)
            rewakes += got.rewakes
            requests += got.requests
            o, a = demand(reqs, activity, seconds, room)
            over, awake = over + o, awake + a / n
        found[n] = {
            "requests": requests,
            "wakes": wakes,
            "evicting_wake_share": evicting / wakes if wakes else 0.0,
            "rewake_share": rewakes / requests if requests else 0.0,
            "over_budget_share": over / len(seeds),
            "awake_share": awake / len(seeds),
        }
    return found


def onset(found: dict[int, dict[str, float]], key: str, threshold: float) -> int | None:
    """The fewest scanned count from which `key` stays above `threshold` at every larger count."""
    above: int | None = None
    for n in sorted(found):
        over = found[n][key] > threshold
        above = (above or n) if over else None
    return above
