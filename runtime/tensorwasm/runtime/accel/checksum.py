"""The word sum: the checksum a snapshot hot-tier entry is sealed with, on host memory.

`word_sum(data)` adds the little-endian 64-bit words of `data` modulo 2^64, a ragged tail counting
as one more word of its remaining bytes. numpy's reduction releases the GIL and runs at memory
bandwidth; the CUDA backend computes the same sum on the device (`tw_chunk_word_sums` in
kernels.py), so a buffer can be checked where it landed. Any damage confined to one word changes
the sum; it is a corruption check, not a defence against a forger.
Must not import cuda or wasmtime.
"""

from __future__ import annotations

import numpy as np

MASK = (1 << 64) - 1


def word_sum(data: memoryview) -> int:
    n = len(data)
    whole = n - n % 8
    total = int(np.add.reduce(np.frombuffer(data[:whole], dtype="<u8"), dtype=np.uint64)) if whole else 0
    if whole != n:
        total += int.from_bytes(data[whole:], "little")
    return total & MASK


def chunk_word_sums(data: memoryview, chunk: int) -> list[int]:
    """word_sum of each `chunk`-byte piece of `data` (the last may be shorter)."""
    return [word_sum(data[at : at + chunk]) for at in range(0, len(data), chunk)]
