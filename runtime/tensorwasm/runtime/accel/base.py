"""The accelerator contract: what a tenant's GPU view and a device backend must offer.

Owns the `Accelerator` / `TenantDevice` protocols, `KernelArg` and `AcceleratorHealth` (the shapes other
layers code against; see docs/architecture.md). Pure: must not import cuda, pynvml, numpy or wasmtime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

ArgKind = Literal["buffer", "i32", "u32", "i64", "u64", "f32", "f64"]
ARG_KINDS: frozenset[str] = frozenset({"buffer", "i32", "u32", "i64", "u64", "f32", "f64"})

# The CUDA pool maps device memory in 2 MiB pages on Hopper; the CPU backend counts the same way so that
# both backends refuse the same allocations (the CPU one is the oracle for the CUDA one).
DEFAULT_GRANULARITY = 2 << 20


@dataclass(frozen=True)
class KernelArg:
    """One typed kernel argument; for "buffer" the value is a handle of the same tenant."""

    kind: ArgKind
    value: int | float


@dataclass(frozen=True)
class AcceleratorHealth:
    """Readiness view of a backend: not ok once a sticky CUDA error poisoned the context."""

    ok: bool
    reason: str = ""
    mps: str = "off"  # "off" | "client" | "daemon"


class TenantDevice(Protocol):
    """One tenant's view of the device. Guests only ever see int handles, never addresses."""

    tenant_id: str
    cap_bytes: int | None

    def bytes_in_use(self) -> int: ...
    def alloc(self, nbytes: int) -> int: ...
    def free(self, handle: int) -> None: ...
    def write(self, handle: int, offset: int, data: bytes | bytearray | memoryview) -> None: ...
    def read(self, handle: int, offset: int, nbytes: int) -> bytes: ...
    def read_into(self, handle: int, offset: int, out: memoryview) -> None: ...
    def launch(
        self,
        kernel: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[KernelArg],
        shared_mem_bytes: int = 0,
    ) -> None: ...
    def sync(self) -> None: ...
    def buffers(self) -> dict[int, int]: ...
    def restore_buffers(self, sizes: Mapping[int, int]) -> None: ...
    def write_async(self, handle: int, offset: int, src: memoryview) -> None: ...
    def stage_restore(self, sizes: Mapping[int, int]) -> dict[int, int]:
        """Allocate `sizes` beside the live buffers, unpublished: {snapshot handle: temporary handle}.

        All or nothing, charged to the cap (GpuMemoryExhausted when both sets do not fit). Free the
        temporaries to discard them; `publish_restore` makes them the tenant's buffers."""
        ...

    def publish_restore(self, staged: Mapping[int, int]) -> None:
        """Free every buffer not in `staged`, then give each temporary its snapshot handle."""
        ...

    def word_sums(self, handles: Sequence[int], chunk: int) -> list[list[int]]:
        """accel/checksum.py's word sum of each `chunk`-byte piece of each buffer, computed where the
        buffers live, in stream order (after the copies queued before it)."""
        ...

    def clone_buffers(self) -> BufferClone | None:
        """A device-side copy of every buffer, taken in stream order (None: no room, copy to host)."""
        ...


class BufferClone(Protocol):
    """A frozen device-side copy of a tenant's buffers: read back to host after the tenant resumed."""

    def read_into(self, handle: int, out: memoryview) -> None: ...
    def close(self) -> None: ...


class Accelerator(Protocol):
    """A device backend: "cpu" (numpy oracle) or "cuda" (one owner thread per device)."""

    name: str

    def open_tenant(
        self, tenant_id: str, cap_bytes: int | None, ptx_modules: Mapping[str, str] | None = None
    ) -> TenantDevice: ...
    def close_tenant(self, tenant_id: str) -> None: ...
    def memory_info(self) -> tuple[int, int]: ...
    def close(self) -> None: ...
    def health(self) -> AcceleratorHealth: ...
    def pinned_buffer(self, nbytes: int) -> memoryview: ...
    def host_region(self, nbytes: int) -> memoryview:
        """Host memory of its own (page-locked on CUDA) that lives until close(): the snapshot hot tier."""
        ...


@dataclass(frozen=True)
class TenantUsage:
    """Per-tenant numbers for metrics: host-counted bytes, cap, and the driver pool's reserved bytes."""

    tenant_id: str
    bytes_in_use: int
    cap_bytes: int | None
    pool_reserved_bytes: int | None = None
