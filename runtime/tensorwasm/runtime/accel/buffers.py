"""Handle bookkeeping shared by both backends: lookups and byte-range checks with clear errors.

A tenant's buffers live in a dict handle -> (backend object, size, charged bytes); guests only ever hold
the int handle. Pure: must not import cuda, numpy or wasmtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from tensorwasm.runtime.errors import BadRequest, TenantNotReady

T = TypeVar("T")


def lookup(buffers: Mapping[int, T], handle: int, tenant_id: str) -> T:
    """The entry of `handle`, or BadRequest naming the tenant (a handle is only valid in its tenant)."""
    try:
        return buffers[handle]
    except (KeyError, TypeError):
        raise BadRequest(f"unknown GPU buffer handle {handle!r} for tenant {tenant_id!r}") from None


def check_span(handle: int, size: int, offset: Any, nbytes: Any) -> None:
    """Refuse a read/write outside [0, size) of buffer `handle`."""
    if (
        type(offset) is not int
        or type(nbytes) is not int
        or offset < 0
        or nbytes < 0
        or offset + nbytes > size
    ):
        raise BadRequest(
            f"byte range offset={offset!r} length={nbytes!r} is outside buffer {handle} of {size} bytes",
            handle=handle,
            size=size,
        )


def check_restore_sizes(sizes: Mapping[int, int]) -> dict[int, int]:
    """Validate a snapshot's handle -> size map before anything is freed."""
    out: dict[int, int] = {}
    for handle, size in sizes.items():
        if type(handle) is not int or handle <= 0 or type(size) is not int or size <= 0:
            raise BadRequest(f"bad buffer entry in restore: handle={handle!r} size={size!r}")
        out[handle] = size
    return out


def closed(tenant_id: str) -> TenantNotReady:
    return TenantNotReady(f"tenant {tenant_id!r} has no device any more (closed)", tenant=tenant_id)
