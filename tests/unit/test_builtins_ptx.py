"""The built-in kernels shipped as PTX (accel/builtins_ptx.py) for images without NVRTC: generated from
the current CUDA_SOURCE, with an entry for every built-in and internal kernel, in a PTX ISA the
project's minimum driver (CUDA 13.0) accepts."""

from __future__ import annotations

import hashlib
import re

from tensorwasm.runtime.accel import builtins_ptx
from tensorwasm.runtime.accel.kernels import BUILTIN_SIGNATURES, CUDA_SOURCE


def test_the_shipped_ptx_is_generated_from_the_current_source() -> None:
    # A change to CUDA_SOURCE must be followed by hack/kernels/gen_builtins_ptx.py, else shards
    # without NVRTC would run stale kernels (cuda.py refuses them, this test says why first).
    assert hashlib.sha256(CUDA_SOURCE.encode()).hexdigest() == builtins_ptx.SOURCE_SHA256


def test_every_kernel_has_an_entry_and_the_isa_is_one_a_13_0_driver_reads() -> None:
    entries = set(re.findall(r"\.visible \.entry (\w+)\(", builtins_ptx.PTX))
    assert entries == {*BUILTIN_SIGNATURES, "tw_chunk_word_sums"}
    version = re.search(r"^\.version (\d+)\.(\d+)$", builtins_ptx.PTX, re.MULTILINE)
    assert version is not None and (int(version[1]), int(version[2])) <= (9, 0)
    assert re.search(r"^\.target sm_80$", builtins_ptx.PTX, re.MULTILINE)
