"""Admission's room for sleepers with mixed caps, against the exact share of wakes that find it full.

Not a timing: the operator's admission (tensorwasm.planner.admission.sleepers_awake_bytes) decides
how many sleepers a shard's room holds from two sums (O(1) per decision). With equal caps that is
the planner's binomial tail, which bench_sleep.py measured. With caps that differ it is a model
(their effective count and cap-weighted mean cap); this computes, exactly, how often a waking
tenant then finds the room full, for seeded random mixes of caps, beside the rules it was chosen
over: the plain average cap (k of n tenants times the mean cap), the mean (f times the caps) the
operator used before, and the k largest caps (the strict bound, not O(1)).

Each mix: a room of R cap units (16-96), caps drawn from one family (uniform 1-16, two sizes, powers
of two, rare big caps among small ones), every tenant awake f of the time independently. Tenants are
admitted in drawn order until the rule refuses one; then for each admitted tenant the probability
that the others' awake caps leave less than its own cap is summed exactly (a convolution, per
distinct cap) and averaged over the tenants, as each wakes equally often.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Callable

import numpy as np

from tensorwasm.planner.admission import sleepers_awake_bytes
from tensorwasm.planner.awake import SWAP_TOLERANCE, awake_at_once

FRACTIONS = (0.05, 0.1, 0.25)
MIXES = 150  # per fraction
MOST_TENANTS = 1000
SEED = 20261130

Rule = Callable[[list[int], float], int]  # caps, f -> room units the sleepers need


def _admission(caps: list[int], f: float) -> int:
    return sleepers_awake_bytes(sum(caps), sum(c * c for c in caps), f)


def _average(caps: list[int], f: float) -> int:
    return math.ceil(awake_at_once(len(caps), f) * sum(caps) / len(caps))


def _mean(caps: list[int], f: float) -> int:
    return math.ceil(f * sum(caps))


def _largest(caps: list[int], f: float) -> int:
    return sum(sorted(caps, reverse=True)[: awake_at_once(len(caps), f)])


RULES: dict[str, Rule] = {"admission": _admission, "average": _average, "mean": _mean, "k_largest": _largest}


def _family(rng: random.Random) -> tuple[str, Callable[[random.Random], int]]:
    kind = rng.randrange(4)
    if kind == 0:
        return "uniform", lambda r: r.randint(1, 16)
    if kind == 1:
        small, big = rng.randint(1, 8), rng.randint(8, 40)
        return "two sizes", lambda r: r.choice((small, big))
    if kind == 2:
        return "powers of two", lambda r: 2 ** r.randint(0, 5)
    share, big = rng.random() * 0.3, rng.randint(8, 48)
    return "rare big", lambda r: big if r.random() < share else r.randint(1, 3)


def _admit(rule: Rule, draw: Callable[[random.Random], int], seed: int, room: int, f: float) -> list[int]:
    rng = random.Random(seed)
    caps: list[int] = []
    while len(caps) < MOST_TENANTS:
        trial = [*caps, draw(rng)]
        if max(rule(trial, f), trial[-1]) > room:
            break
        caps = trial
    return caps


def full_share(caps: list[int], room: int, f: float) -> float:
    """The share of wakes that find `room` full: tenant i wakes while the others hold more than
    room - c_i awake. Exact; sums above the room are lumped into one bin (index room + 1)."""
    counts = Counter(caps)
    full = 0.0
    for cap, waking in counts.items():
        dist = np.zeros(room + 2)
        dist[0] = 1.0
        for other, count in counts.items():
            for _ in range(count - (other == cap)):
                shifted = np.zeros(room + 2)
                shifted[other : room + 1] = dist[: max(room + 1 - other, 0)]
                over = dist[max(room + 1 - other, 0) : room + 1].sum() + dist[room + 1]
                dist = (1 - f) * dist + f * shifted
                dist[room + 1] += f * over  # what shifted past the room stays past it
        full += waking * float(dist[max(room - cap + 1, 0) :].sum())
    return full / len(caps)


def run() -> dict[str, object]:
    rng = random.Random(SEED)
    shares: dict[str, list[float]] = {name: [] for name in RULES}
    tenants: dict[str, list[int]] = {name: [] for name in RULES}
    worst: dict[str, tuple[float, str]] = {name: (0.0, "") for name in RULES}
    for f in FRACTIONS:
        for _ in range(MIXES):
            room, (family, draw), seed = rng.randint(16, 96), _family(rng), rng.randrange(1 << 30)
            for name, rule in RULES.items():
                caps = _admit(rule, draw, seed, room, f)
                if not caps:
                    continue
                share = full_share(caps, room, f)
                shares[name].append(share)
                tenants[name].append(len(caps))
                if share > worst[name][0]:
                    where = f"{family}, room {room}, f {f}, {len(caps)} tenants, largest cap {max(caps)}"
                    worst[name] = (share, where)
    base = statistics.fmean(tenants["admission"])
    figures: dict[str, float] = {"mixes": float(len(shares["admission"]))}
    rows = [
        "| rule | median | p90 | max | mixes over 1% | max, 20+ tenants | tenants vs admission |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in RULES:
        s = sorted(shares[name])
        median, p90 = s[len(s) // 2], s[int(0.9 * len(s))]
        over = sum(x > SWAP_TOLERANCE for x in s) / len(s)
        crowded = max((x for x, n in zip(shares[name], tenants[name], strict=True) if n >= 20), default=0.0)
        density = statistics.fmean(tenants[name]) / base
        figures |= {
            f"{name}_full_median": round(median, 4), f"{name}_full_p90": round(p90, 4),
            f"{name}_full_max": round(s[-1], 4), f"{name}_over_tolerance_share": round(over, 3),
            f"{name}_full_max_20_tenants": round(crowded, 4),
            f"{name}_tenants_vs_admission": round(density, 2),
        }  # fmt: skip
        cells = [name, f"{median:.2%}", f"{p90:.2%}", f"{s[-1]:.2%} ({worst[name][1]})", f"{over:.0%}",
                 f"{crowded:.2%}", f"{density:.2f}x"]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return {
        "title": "Admission's sleeper room with mixed caps (exact, not timed)",
        "figures": figures,
        "targets": {"admission_full_p90": "<= 0.0125"},
        "table": "\n".join(rows),
        "notes": (
            f"{MIXES} seeded mixes at each f in {', '.join(map(str, FRACTIONS))}; share of wakes that find "
            "the room full, computed exactly (docs/capacity-planning.md, 'Admission with sleepers'). "
            "Equal caps give the planner's binomial tail under every rule but the mean."
        ),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
