"""The snapshot hot tier: recently captured or restored snapshots, decoded, in pinned host memory.

A restore that hits the tier skips the file, the CRC-32 and zstd: it checks the entry's seals and copies
host to device, the physical floor. Owns `HotTier` (one per accelerator, bounded by a byte budget),
`Arena` (first-fit ranges of one host region, allocated on first use: page-locked on CUDA via
`Accelerator.host_region`), `HotEntry` and `seal`.
- An entry holds a verified blob's decoded state in the restore layout, its manifest and one seal per
  chunk. It is keyed by the blob digest, so it is only ever the bytes that blob decodes to.
- Room is made by evicting the least recently used entry no restore holds. A restore leases its
  entry: evicting a leased entry only unlists it; its range returns to the arena with the last lease,
  so a copy engine never reads memory that was handed to another entry.
- Seals: a 64-bit word sum per chunk (accel/checksum.py: numpy on the host, a kernel on the device,
  so a restore checks GPU chunks where they landed, in unpublished buffers, at HBM speed). Any
  damage confined to one word is always caught (a flipped bit, a stray store); wider random damage
  escapes with probability 2^-64. Not a defence against a forger: the tier is this process's memory.
Must not import wasmtime, cuda or the engine.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tensorwasm.runtime import metrics
from tensorwasm.runtime.accel.checksum import MASK, word_sum
from tensorwasm.runtime.snapshots import codec

log = logging.getLogger(__name__)

ALIGN = 4096  # page-aligned ranges: DMA friendly, and the restore layout is page-aligned too


def chunk_seal(data: memoryview) -> int:
    """The seal of one chunk: its word sum (accel/checksum.py) mixed with its length, so that a
    truncated view never matches."""
    return seal_of(word_sum(data), len(data))


def seal_of(words: int, nbytes: int) -> int:
    """A seal from a word sum computed elsewhere (the device's, for a chunk already uploaded)."""
    return (words + nbytes * 0x9E3779B97F4A7C15) & MASK


class Arena:
    """First-fit allocator of aligned ranges in [0, size); free ranges coalesce. Not thread-safe."""

    def __init__(self, size: int) -> None:
        self.size = size - size % ALIGN
        self._free: list[tuple[int, int]] = [(0, self.size)] if self.size else []  # (start, length), sorted

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self._free)

    def alloc(self, nbytes: int) -> int | None:
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for i, (start, n) in enumerate(self._free):
            if n >= need:
                if n == need:
                    del self._free[i]
                else:
                    self._free[i] = (start + need, n - need)
                return start
        return None

    def free(self, start: int, nbytes: int) -> None:
        n = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        i = bisect.bisect_left(self._free, (start, 0))
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] > start:
            raise ValueError(f"range at {start} is already free")
        if i < len(self._free) and start + n > self._free[i][0]:
            raise ValueError(f"range at {start} overlaps a free range")
        if i < len(self._free) and start + n == self._free[i][0]:
            n += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            start, n = self._free[i - 1][0], self._free[i - 1][1] + n
            i -= 1
            self._free.pop(i)
        self._free.insert(i, (start, n))


@dataclass
class Slot:
    """A range of the tier's memory, owned by whoever reserved it until it is inserted or released."""

    start: int
    nbytes: int
    view: memoryview


@dataclass
class HotEntry:
    """One blob's decoded state. `seals[i]` seals chunk i's decoded bytes at its place in the layout."""

    digest: str
    manifest: codec.Manifest
    slot: Slot
    seals: list[int]
    leases: int = 0
    listed: bool = True
    plan: Any = field(default=None, repr=False)  # the restore's layout of this manifest, memoised


class HotTier:
    """At most `max_bytes` of decoded snapshots; thread-safe; memory allocated on first use."""

    def __init__(self, max_bytes: int, allocate: Callable[[int], memoryview]) -> None:
        self.max_bytes = max_bytes
        self._allocate = allocate
        self._memory: memoryview | None = None
        self._arena = Arena(max_bytes)
        self._entries: OrderedDict[str, HotEntry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._used = 0
        metrics.SNAPSHOT_HOT_TIER_BYTES.labels("capacity").set(self._arena.size)

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._entries

    @property
    def used_bytes(self) -> int:
        return self._used

    def digests(self) -> list[str]:
        """Listed entries, least recently used first."""
        with self._lock:
            return list(self._entries)

    def reserve(self, nbytes: int) -> Slot | None:
        """A range of `nbytes`, evicting least recently used unleased entries; None if it cannot fit."""
        if nbytes <= 0 or nbytes > self._arena.size:
            return None
        with self._lock:
            if self._memory is None:
                self._memory = self._allocate(self._arena.size)
            while (start := self._arena.alloc(nbytes)) is None:
                victim = next((e for e in self._entries.values() if e.leases == 0), None)
                if victim is None:
                    return None  # everything left is in use by restores
                self._unlist(victim)
                metrics.SNAPSHOT_HOT_TIER_EVICTIONS.inc()
            self._account(nbytes)
            return Slot(start, nbytes, self._memory[start : start + nbytes])

    def release(self, slot: Slot) -> None:
        """Give back a reserved slot that was not inserted (a failed capture or restore)."""
        with self._lock:
            self._arena.free(slot.start, slot.nbytes)
            self._account(-slot.nbytes)

    def insert(self, slot: Slot, digest: str, manifest: codec.Manifest, seals: list[int]) -> None:
        """Publish a filled slot as the entry of `digest` (most recently used); a duplicate is dropped."""
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
                duplicate = True
            else:
                self._entries[digest] = HotEntry(digest, manifest, slot, seals)
                duplicate = False
        if duplicate:
            self.release(slot)

    @contextlib.contextmanager
    def lease(self, digest: str) -> Iterator[HotEntry | None]:
        """The entry of `digest` (None on a miss), kept alive until the block ends."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                entry.leases += 1
                self._entries.move_to_end(digest)
        try:
            yield entry
        finally:
            if entry is not None:
                with self._lock:
                    entry.leases -= 1
                    if entry.leases == 0 and not entry.listed:
                        self._free(entry)

    def drop(self, digest: str) -> None:
        """Unlist an entry (found corrupt): no later restore sees it; memory returns when unleased."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                self._unlist(entry)

    def _unlist(self, entry: HotEntry) -> None:
        del self._entries[entry.digest]
        entry.listed = False
        if entry.leases == 0:
            self._free(entry)

    def _free(self, entry: HotEntry) -> None:
        self._arena.free(entry.slot.start, entry.slot.nbytes)
        self._account(-entry.slot.nbytes)

    def _account(self, delta: int) -> None:
        self._used += delta
        metrics.SNAPSHOT_HOT_TIER_BYTES.labels("used").set(self._used)


class HotTiers:
    """One tier per accelerator, sized by `configure` (the shard's settings); 0 bytes turns it off."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._max_bytes = 0
        self._tiers: dict[int, tuple[Any, HotTier]] = {}

    def configure(self, max_bytes: int) -> None:
        with self._lock:
            self._max_bytes = max(0, max_bytes)
            self._tiers.clear()

    def for_accelerator(self, accelerator: Any) -> HotTier | None:
        if accelerator is None or self._max_bytes <= 0:
            return None
        with self._lock:
            found = self._tiers.get(id(accelerator))
            if found is None or found[0] is not accelerator:
                tier = HotTier(self._max_bytes, accelerator.host_region)
                found = self._tiers[id(accelerator)] = (accelerator, tier)
            return found[1]

    def forget(self, accelerator: Any) -> None:
        """Drop the tier of an accelerator about to close (its memory goes with it)."""
        with self._lock:
            self._tiers.pop(id(accelerator), None)


HOT_TIERS = HotTiers()


def digest_of(path: Any) -> str | None:
    """The blob digest a store path is named by (`<digest>.twsnap`), or None for another name."""
    name = str(getattr(path, "name", ""))
    stem = name.rsplit(".", 1)[0]
    if len(stem) == 32 and all(c in "0123456789abcdef" for c in stem):
        return stem
    return None
