"""The deadline of the invoke running on this thread, for host work that must honour it.

Owns a thread-local monotonic deadline: the engine sets it before running guest code (the same
timeout its epoch deadline enforces) and clears it after; long host-side work done for the guest
(the CPU backend's kernels) calls `check()` between bounded steps, so a kernel cannot outrun the
invoke's deadline by more than one step. Pure (stdlib only); must not import wasmtime, cuda or numpy.
"""

from __future__ import annotations

import threading
import time

from tensorwasm.runtime.errors import DeadlineExceeded

_local = threading.local()


def set_deadline(seconds_from_now: float | None) -> None:
    """Start (or with None, end) the current thread's invoke deadline."""
    _local.at = None if seconds_from_now is None else time.monotonic() + seconds_from_now


def check() -> None:
    """Raise DeadlineExceeded if this thread's invoke deadline has passed (no deadline: no-op)."""
    at = getattr(_local, "at", None)
    if at is not None and time.monotonic() > at:
        raise DeadlineExceeded("the invoke ran past its deadline inside a host kernel")
