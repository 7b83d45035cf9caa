"""Shared machinery of capture and restore: the worker threads, reusable host staging, the pool protocol.

Owns one process-wide thread pool (zstd, zlib.crc32, numpy copies, pread and pwrite all release the GIL, so
threads scale across cores) and a cache of host staging buffers per accelerator: page-locked for
CUDA via `Accelerator.pinned_buffer`, plain memory otherwise. Reusing staging matters twice: pinned
allocation costs tens of ms, and first-touch page faults of fresh memory cost more than the copy.
Must not import wasmtime, cuda or the engine (the engine's pool is reached through `SnapshotPool`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from tensorwasm.runtime.accel.base import Accelerator


class WasmStateLike(Protocol):
    memory: bytes | memoryview
    globals: list[tuple[str, str, int | float]]


class SnapshotPool(Protocol):
    """The part of the engine's TenantInstancePool that snapshots use."""

    def capture_state(self) -> Any: ...
    def restore_state(self, state: Any) -> None: ...
    def quiesce(self) -> AbstractContextManager[None]: ...


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def workers() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            n = int(os.environ.get("TENSORWASM_RUNTIME_SNAPSHOT_THREADS", "0")) or min(
                32, os.cpu_count() or 2
            )
            _executor = ThreadPoolExecutor(max_workers=n, thread_name_prefix="tw-snapshot")
        return _executor


def parallel_copy(dst: memoryview, src: bytes | memoryview, piece: int = 4 << 20) -> None:
    """memcpy split over the worker threads (numpy copies release the GIL)."""
    d = np.frombuffer(dst, dtype=np.uint8)
    s = np.frombuffer(src, dtype=np.uint8)
    if len(s) <= piece:
        np.copyto(d[: len(s)], s)
        return

    def one(start: int) -> None:
        np.copyto(d[start : start + piece], s[start : start + piece])

    list(workers().map(one, range(0, len(s), piece)))


class Staging:
    """Host staging during one turn: `view(n)` returns n bytes, grown on demand, stable for the turn."""

    def __init__(self, cache: StagingCache, accelerator: Accelerator | None) -> None:
        self._cache, self._accelerator = cache, accelerator

    def view(self, nbytes: int) -> memoryview:
        if self._accelerator is not None:
            return self._accelerator.pinned_buffer(max(nbytes, 1)).cast("B")[:nbytes]
        key = id(self._accelerator)
        buf = self._cache.host.get(key)
        if buf is None or len(buf) < nbytes:
            buf = self._cache.host[key] = memoryview(bytearray(max(nbytes, 1)))
        return buf[:nbytes]


class StagingCache:
    """One staging area per accelerator, used by one capture/restore at a time.

    `Accelerator.pinned_buffer` hands every caller the same grown-on-demand region, so users of one
    accelerator take turns; the lock is per accelerator, so other devices do not wait.
    Lock order everywhere: a staging turn first, then the tenant's quiesce barrier (no cycle).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turns: dict[int, threading.Lock] = {}
        self.host: dict[int, memoryview] = {}

    @contextlib.contextmanager
    def turn(self, accelerator: Accelerator | None) -> Iterator[Staging]:
        with self._lock:
            lock = self._turns.setdefault(id(accelerator), threading.Lock())
        with lock:
            yield Staging(self, accelerator)

    def clear(self) -> None:
        with self._lock:
            self.host.clear()


STAGING = StagingCache()  # decoded state (pinned for CUDA)
PACKED = StagingCache()  # compressed chunks read ahead of decoding (plain host memory)


class Stopwatch:
    """Phase timings in seconds, in the order they were taken."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now

    def total(self) -> dict[str, float]:
        return {**self.phases, "total": self.last - self.start}


def layout(sizes: Sequence[int], align: int = 4096) -> list[int]:
    """Offsets of consecutive pieces in one staging buffer, each page-aligned (DMA friendly)."""
    offsets, cursor = [], 0
    for n in sizes:
        offsets.append(cursor)
        cursor += -(-n // align) * align
    offsets.append(cursor)
    return offsets
