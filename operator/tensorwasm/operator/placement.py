"""Which shard serves which tenant: capacity-aware rendezvous hashing with bounded load.

Owns the in-memory ledger of placements (tenant -> shard ordinal + demand) and the pure decisions:
- a new tenant goes to the highest-scoring shard (rendezvous hash of tenant and shard) that has room
  for its demand (planner admission) and is not loaded past LOAD_FACTOR x the mean (even spread);
- a placed tenant stays where it is (sticky) until its shard goes away;
- growing the shard set moves only tenants whose best shard is a new one, at most a fair share each;
- shrinking moves only the removed shards' tenants;
- a tenant placed on one shard while another still serves it (its move waits for the target pod,
  or is in flight) counts on both: the source must keep its room until the tenant has left (or
  comes back), so new tenants never overfill it meanwhile.
Must not import kopf, kube/ or anything doing I/O; fit tests come from tensorwasm.planner.admission.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass

from tensorwasm.planner.admission import (
    RESOURCE_ORDER,
    ShardCapacity,
    ShardUsage,
    TenantDemand,
    binding_resource,
    insufficient_capacity_message,
    used_value,
)

# Bounded-load factor: no shard takes a new tenant while it holds more than 1.25x the mean,
# unless no other shard has room (keeps the spread even without giving up stickiness).
LOAD_FACTOR = 1.25


def score(tenant: str, shard: int) -> int:
    """Rendezvous weight of (tenant, shard); stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{tenant}\x00{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranked(tenant: str, shards: int) -> list[int]:
    """Shard ordinals from most to least preferred for `tenant`."""
    return sorted(range(shards), key=lambda s: score(tenant, s), reverse=True)


@dataclass(frozen=True)
class Decision:
    """A placement outcome: a shard, or none with the binding resource and a readable message."""

    shard: int | None
    resource: str | None = None
    message: str = ""


@dataclass(frozen=True)
class Move:
    tenant: str
    source: int
    target: int | None  # None: nowhere has room, the tenant goes back to Pending


class Ledger:
    """Placements the operator has decided (and persists in status.shard); not thread-safe."""

    def __init__(self, capacity: ShardCapacity, shards: int) -> None:
        if shards < 0:
            raise ValueError(f"shards must be >= 0, got {shards}")
        self.capacity = capacity
        self.shards = shards
        self._placed: dict[str, tuple[int, TenantDemand]] = {}
        # Tenant -> the shard still serving it while it is placed on another (absent: the one placed).
        self._served: dict[str, int] = {}
        # Per shard: the tenants placed on it plus those it still serves while placed elsewhere.
        self._usage: list[ShardUsage] = [ShardUsage() for _ in range(shards)]

    # -- reads ---------------------------------------------------------------------------------
    def shard_of(self, tenant: str) -> int | None:
        entry = self._placed.get(tenant)
        return None if entry is None else entry[0]

    def demand_of(self, tenant: str) -> TenantDemand | None:
        entry = self._placed.get(tenant)
        return None if entry is None else entry[1]

    def serving(self, tenant: str) -> int | None:
        """The shard serving `tenant` now: the one `serve` last named, else the one it is placed on."""
        entry = self._placed.get(tenant)
        return None if entry is None else self._served.get(tenant, entry[0])

    def usage(self, shard: int) -> ShardUsage:
        """What `shard` holds: its placed tenants and those it still serves while placed elsewhere."""
        return self._usage[shard]

    def counts(self) -> list[int]:
        return [u.tenants for u in self._usage]

    def tenants(self) -> dict[str, int]:
        return {name: shard for name, (shard, _) in self._placed.items()}

    # -- writes --------------------------------------------------------------------------------
    def assign(self, tenant: str, shard: int, demand: TenantDemand) -> None:
        """Record `tenant` on `shard` (adoption of an existing status.shard does not check room).

        Placing is not moving: the shard serving an already placed tenant keeps counting it (see
        `serve`) until the tenant's move says it has left, or it comes back."""
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard {shard} is outside 0..{self.shards - 1}")
        serving = self.serving(tenant)
        self.release(tenant)
        self._placed[tenant] = (shard, demand)
        self._usage[shard] = self._usage[shard].plus(demand)
        self.serve(tenant, serving)

    def serve(self, tenant: str, shard: int | None) -> None:
        """Record which shard serves the placed `tenant` now (status.shard, or the source its
        Service still selects while the target restores): while that is not the shard it is placed
        on, both count it. None, or a shard outside the set (one scaled in): only the placed one."""
        entry = self._placed.get(tenant)
        if entry is None:
            return
        placed, demand = entry
        old = self._served.pop(tenant, None)
        if old is not None:
            self._usage[old] = self._usage[old].minus(demand)
        if shard is not None and 0 <= shard < self.shards and shard != placed:
            self._served[tenant] = shard
            self._usage[shard] = self._usage[shard].plus(demand)

    def release(self, tenant: str) -> int | None:
        entry = self._placed.pop(tenant, None)
        if entry is None:
            return None
        shard, demand = entry
        self._usage[shard] = self._usage[shard].minus(demand)
        served = self._served.pop(tenant, None)
        if served is not None:
            self._usage[served] = self._usage[served].minus(demand)
        return shard

    def place(self, tenant: str, demand: TenantDemand, preferred: int | None = None) -> Decision:
        """Decide and record a shard for an unplaced tenant (a placed one keeps its shard)."""
        current = self.shard_of(tenant)
        if current is not None:
            return Decision(current)
        decision = self.decide(tenant, demand, preferred)
        if decision.shard is not None:
            self.assign(tenant, decision.shard, demand)
        return decision

    def decide(self, tenant: str, demand: TenantDemand, preferred: int | None = None) -> Decision:
        """Pure choice for an unplaced tenant against the current usage; records nothing."""
        if self.shards == 0:
            return Decision(None, "shards", "no runtime shards exist (the shard StatefulSet has 0 replicas)")
        fits = {s: binding_resource(self.capacity, self._usage[s], demand) for s in range(self.shards)}
        if preferred is not None and preferred < self.shards and fits[preferred] is None:
            return Decision(preferred)
        order = ranked(tenant, self.shards)
        bound = math.ceil(LOAD_FACTOR * (sum(self.counts()) + 1) / self.shards)
        for shard in order:
            if fits[shard] is None and self._usage[shard].tenants + 1 <= bound:
                return Decision(shard)
        for shard in order:
            if fits[shard] is None:
                return Decision(shard)
        return self._insufficient(demand, fits, order)

    def _insufficient(self, demand: TenantDemand, fits: dict[int, str | None], order: list[int]) -> Decision:
        tally = Counter(r for r in fits.values() if r is not None)
        resource = max(RESOURCE_ORDER, key=lambda r: (tally[r], -RESOURCE_ORDER.index(r)))
        # Name the shard with the most room on the binding resource: the nearest miss.
        nearest = min(
            (s for s in order if fits[s] == resource),
            key=lambda s: used_value(self._usage[s], resource),
        )
        detail = insufficient_capacity_message(self.capacity, self._usage[nearest], demand, resource)
        message = f"no shard of {self.shards} has room; the nearest (shard {nearest}): {detail}"
        return Decision(None, resource, message)

    def resize(self, shards: int) -> list[Move]:
        """Change the shard count and return the minimal moves, already applied to the ledger."""
        if shards < 0:
            raise ValueError(f"shards must be >= 0, got {shards}")
        old = self.shards
        placed, served = dict(self._placed), dict(self._served)
        self.shards = shards
        self._placed, self._served = {}, {}
        self._usage = [ShardUsage() for _ in range(shards)]
        homeless: list[tuple[str, int, TenantDemand]] = []
        for name in sorted(placed):
            shard, demand = placed[name]
            if shard < shards:
                self.assign(name, shard, demand)
                self.serve(name, served.get(name))  # still served where it was (a shard still in the set)
            else:
                homeless.append((name, shard, demand))
        moves: list[Move] = []
        for name, source, demand in homeless:
            decision = self.place(name, demand)
            self.serve(name, served.get(name))
            moves.append(Move(name, source, decision.shard))
        if shards > old:
            moves.extend(self._rebalance_onto(range(old, shards)))
        return moves

    def _rebalance_onto(self, new_shards: range) -> list[Move]:
        """Move to each new shard the tenants that now rank it first, up to a fair share."""
        fair = len(self._placed) // self.shards
        candidates: dict[int, list[str]] = {s: [] for s in new_shards}
        for name in self._placed:
            best = ranked(name, self.shards)[0]
            if best in candidates:
                candidates[best].append(name)
        moves: list[Move] = []
        for shard, names in candidates.items():
            names.sort(key=lambda n: score(n, shard), reverse=True)
            for name in names:
                if self._usage[shard].tenants >= fair:
                    break
                source, demand = self._placed[name]
                if binding_resource(self.capacity, self._usage[shard], demand) is not None:
                    continue
                self.assign(name, shard, demand)
                moves.append(Move(name, source, shard))
        return moves
