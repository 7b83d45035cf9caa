"""Shard admission with sleepers: the room is the binomial tail of the awake set, not its mean.

A room of 8 caps at 10% active holds 32 independent sleepers (a waking one finds the other 31 hold
all 8 caps at most 1% of the time), not the mean's 80, where bench_sleep.py saw 80% of wakes evict.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from tensorwasm.planner.admission import (
    ShardCapacity,
    ShardUsage,
    TenantDemand,
    binding_resource,
    insufficient_capacity_message,
    sleepers_awake_bytes,
)
from tensorwasm.planner.awake import SWAP_TOLERANCE, awake_at_once

MI = 1 << 20
GI = 1 << 30
F = 0.1
# 8 caps of 1 GiB awake: the slice keeps the 1.5x fragmentation headroom on them. Host memory and
# the tenant count are out of the way unless a test says otherwise.
ROOM_8 = ShardCapacity(12 * GI, 100, 1 << 50, 100_000, active_fraction=F)
SLEEPER = TenantDemand(GI, 0, 0, sleeps=True)


def _at_least(n: int, p: float, k: int) -> float:
    """P(Binomial(n, p) >= k) by brute force: the oracle for the room a waking tenant finds."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def _fill(capacity: ShardCapacity, demands: list[TenantDemand], used: ShardUsage | None = None
          ) -> tuple[ShardUsage, list[TenantDemand], str | None]:  # fmt: skip
    """Admit `demands` in order until one is refused: (usage, those admitted, the binding resource)."""
    used = ShardUsage() if used is None else used
    for i, demand in enumerate(demands):
        resource = binding_resource(capacity, used, demand)
        if resource is not None:
            return used, demands[:i], resource
        used = used.plus(demand)
    raise AssertionError(f"all {len(demands)} demands were admitted")


def _full_share(caps: list[int], room: int, f: float) -> float:
    """Exactly, the share of wakes that find `room` full: tenant i (caps in whole units) wakes while
    the others' awake caps exceed room - c_i; every tenant awake f of the time independently."""
    counts: dict[int, int] = {}
    for cap in caps:
        counts[cap] = counts.get(cap, 0) + 1
    full = 0.0
    for cap, waking in counts.items():
        awake = [1.0]  # awake[s]: P(the others hold s units awake)
        for other, count in counts.items():
            for _ in range(count - (other == cap)):
                step = [x * (1 - f) for x in awake] + [0.0] * other
                for s, x in enumerate(awake):
                    step[s + other] += x * f
                awake = step
        full += waking * sum(x for s, x in enumerate(awake) if s + cap > room)
    return full / len(caps)


@pytest.mark.parametrize("resource", ["gpuMemory", "hostMemory"])
def test_a_room_of_8_caps_holds_32_sleepers_at_a_tenth_active_not_80(resource: str) -> None:
    if resource == "gpuMemory":
        capacity, sleeper = ROOM_8, SLEEPER
    else:
        capacity, sleeper = replace(ROOM_8, host_memory_bytes=8 * GI), TenantDemand(0, 0, GI, sleeps=True)
    used, admitted, refused = _fill(capacity, [sleeper] * 80)
    assert (len(admitted), refused) == (32, resource)  # the mean f * n admitted all 80
    # The oracle: with 31 others a waking tenant finds all 8 caps held at most 1% of the time; with 32, more.
    assert _at_least(31, F, 8) <= SWAP_TOLERANCE < _at_least(32, F, 8)
    message = insufficient_capacity_message(capacity, used, sleeper, resource)
    assert message.startswith(f"insufficient {resource}: needs 13.5Gi" if resource == "gpuMemory" else
                              f"insufficient {resource}: needs 9Gi")  # fmt: skip
    assert (
        "the sleepers' 33Gi count as 9Gi awake at once" in message
        and "1% of the time at 10% active" in message
    )


def test_every_sleeper_counts_whole_when_all_are_active() -> None:
    _, admitted, refused = _fill(replace(ROOM_8, active_fraction=1.0), [SLEEPER] * 80)
    assert (len(admitted), refused) == (8, "gpuMemory")
    assert sleepers_awake_bytes(40 * GI, 40 * GI * GI, 1.0) == 40 * GI


def test_pinned_tenants_count_whole_and_sleepers_share_the_room_left() -> None:
    pinned = TenantDemand(GI, 0, 0, sleeps=False)
    _, admitted, refused = _fill(ROOM_8, [pinned] * 80)
    assert (len(admitted), refused) == (8, "gpuMemory")  # at a tenth active, as at all of them
    four, _, _ = _fill(ROOM_8, [pinned] * 4 + [SLEEPER] * 80)
    # 4 caps left: 10 sleepers (a waking one finds 4 of 9 others awake at most 1% of the time), not 40.
    assert four.tenants == 4 + 10
    assert _at_least(9, F, 4) <= SWAP_TOLERANCE < _at_least(10, F, 4)
    assert binding_resource(ROOM_8, four, pinned) == "gpuMemory"


def test_the_shards_default_decides_for_tenants_that_set_no_idle_after() -> None:
    default = TenantDemand(GI, 0, 0)  # sleeps None: the shards' idle.after
    _, admitted, _ = _fill(ROOM_8, [default] * 80)
    assert len(admitted) == 8  # the default is `never`: they stay awake
    sleepy = replace(ROOM_8, idle_by_default=True)
    _, admitted, _ = _fill(sleepy, [default] * 80)
    assert len(admitted) == 32
    # Those and the tenants that always sleep are one population of sleepers.
    _, admitted, _ = _fill(sleepy, [default, SLEEPER] * 40)
    assert len(admitted) == 32


def test_minus_mirrors_plus() -> None:
    rng = random.Random(5)
    demands = [
        TenantDemand(rng.randrange(0, 4 * GI), rng.randrange(0, 5), rng.randrange(1, GI), sleeps=sleeps)
        for sleeps in [True, None, False] * 20
    ]
    used = ShardUsage()
    for demand in demands:
        assert used.plus(demand).minus(demand) == used
        used = used.plus(demand)
    for capacity in (ROOM_8, replace(ROOM_8, idle_by_default=True)):
        before = [binding_resource(capacity, used, d) for d in demands]
        again = used.plus(demands[0]).plus(demands[1]).minus(demands[0]).minus(demands[1])
        assert [binding_resource(capacity, again, d) for d in demands] == before
    rng.shuffle(demands)
    for demand in demands:
        used = used.minus(demand)
    assert used == ShardUsage()


def test_accounting_only_sleepers_do_not_thin_out_the_capped_ones() -> None:
    # 100 sleepers without a GPU cap count 0 in admission: a count of sleepers that included them
    # would average the 1 GiB caps down and admit a 33rd.
    free = TenantDemand(0, 0, MI, sleeps=True)
    used, _, _ = _fill(ROOM_8, [free] * 100 + [SLEEPER] * 80)
    assert used.tenants == 100 + 32


def test_a_mix_of_cap_sizes_keeps_wakes_that_find_the_room_full_within_the_tolerance() -> None:
    # Caps in units of 256 MiB: three of 1 and one of 8, over and over, into a room of 32.
    unit = 256 * MI
    pattern = [TenantDemand(unit, 0, 0, sleeps=True)] * 3 + [TenantDemand(8 * unit, 0, 0, sleeps=True)]
    _, admitted, refused = _fill(ROOM_8, pattern * 100)
    caps = [d.gpu_memory_bytes // unit for d in admitted]
    assert refused == "gpuMemory" and len(admitted) > 3 * 8  # far more than fit awake (11)
    assert _full_share(caps, 32, F) <= SWAP_TOLERANCE
    # The plain average cap (k of n tenants times sum / n) admits 51 here, and 4% of wakes find it full.
    average = [d.gpu_memory_bytes // unit for d in (pattern * 100)[:51]]
    assert _full_share(average, 32, F) > 4 * SWAP_TOLERANCE


def test_one_cap_that_dominates_counts_every_sleeper_whole() -> None:
    # A 6 GiB sleeper among 256 MiB ones: the room for 8 caps is taken whenever it wakes with others,
    # so the shard holds what fits all awake (6 GiB + 8 x 256 MiB), as the tail of so few says.
    big, small = TenantDemand(6 * GI, 0, 0, sleeps=True), TenantDemand(256 * MI, 0, 0, sleeps=True)
    used, admitted, _ = _fill(ROOM_8, [big] + [small] * 100)
    assert len(admitted) == 1 + 8
    assert used.expected(ROOM_8)[0] == 8 * GI


@pytest.mark.parametrize("tenants", [1, 2, 9, 32, 33, 500])
def test_equal_caps_hold_the_planners_room(tenants: int) -> None:
    cap = 3 * MI + 1
    assert sleepers_awake_bytes(tenants * cap, tenants * cap * cap, F) == awake_at_once(tenants, F) * cap


def test_a_cap_that_cannot_fit_the_slice_alone_never_fits_however_few_are_awake() -> None:
    many = ShardUsage()
    for _ in range(1000):
        many = many.plus(TenantDemand(MI, 0, 0, sleeps=True))
    too_big = TenantDemand(8 * GI + 1, 0, 0, sleeps=True)  # 1.5x of it is over the 12 GiB slice
    assert binding_resource(ROOM_8, ShardUsage(), too_big) == "gpuMemory"
    assert binding_resource(ROOM_8, many, too_big) == "gpuMemory"
    assert binding_resource(ROOM_8, ShardUsage(), TenantDemand(8 * GI, 0, 0, sleeps=True)) is None
