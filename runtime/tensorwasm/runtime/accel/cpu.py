"""The CPU backend: numpy buffers and numpy twins of the built-in kernels.

Owns `CpuAccelerator` / `CpuTenantDevice`. It is the reference the CUDA backend is tested against and the
fallback when no GPU is usable, so it enforces exactly the same caps (same `GpuCap`, same granularity)
and the same launch checks. Tenant PTX is parsed and checked but cannot run here.
Must not import cuda, pynvml or wasmtime.
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from tensorwasm.runtime import metrics
from tensorwasm.runtime.accel import mps
from tensorwasm.runtime.accel.base import DEFAULT_GRANULARITY, AcceleratorHealth, KernelArg, TenantUsage
from tensorwasm.runtime.accel.buffers import check_restore_sizes, check_span, closed, lookup
from tensorwasm.runtime.accel.checksum import chunk_word_sums
from tensorwasm.runtime.accel.kernels import BUILTIN_SIGNATURES, NUMPY_TWINS, KernelSignature
from tensorwasm.runtime.accel.launch import LaunchLimits, signature_from_ptx, validate_launch
from tensorwasm.runtime.errors import BadRequest, GpuMemoryExhausted, InvalidKernelLaunch
from tensorwasm.runtime.tenancy.gpucap import GpuCap

_Buf = tuple["npt.NDArray[np.uint8]", int, int]  # (bytes, size, charged)


class CpuTenantDevice:
    """A tenant's buffers in host memory, capped like a GPU pool."""

    def __init__(
        self, tenant_id: str, cap_bytes: int | None, granularity: int, ptx: Mapping[str, KernelSignature]
    ) -> None:
        self.tenant_id = tenant_id
        self.cap_bytes = cap_bytes
        self._cap = GpuCap(cap_bytes, granularity)
        self._bufs: dict[int, _Buf] = {}
        self._ids = itertools.count(1)
        self._ptx = dict(ptx)
        self._limits = LaunchLimits()
        self._closed = False

    def bytes_in_use(self) -> int:
        return self._cap.current

    @property
    def cap(self) -> GpuCap:
        return self._cap

    def alloc(self, nbytes: int) -> int:
        if self._closed:
            raise closed(self.tenant_id)
        try:
            charged = self._cap.reserve(nbytes)
        except GpuMemoryExhausted:
            metrics.count_gpu_refusal(self.tenant_id, "host")
            raise
        try:
            buf = np.zeros(nbytes, dtype=np.uint8)
        except (MemoryError, ValueError):
            # Within the cap but not in host memory: the reservation goes back (never left counted).
            self._cap.release(charged)
            metrics.count_gpu_refusal(self.tenant_id, "host")
            limit, current = self._cap.limit or 0, self._cap.current
            raise GpuMemoryExhausted(requested=charged, limit=limit, current=current) from None
        handle = next(self._ids)
        self._bufs[handle] = (buf, nbytes, charged)
        return handle

    def free(self, handle: int) -> None:
        buf = self._bufs.pop(handle, None) if type(handle) is int else None
        if buf is None:
            lookup(self._bufs, handle, self.tenant_id)  # raises the clear error
            return
        self._cap.release(buf[2])

    def write(self, handle: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        arr, size, _ = lookup(self._bufs, handle, self.tenant_id)
        src = np.frombuffer(data, dtype=np.uint8)
        check_span(handle, size, offset, src.size)
        arr[offset : offset + src.size] = src

    def write_async(self, handle: int, offset: int, src: memoryview) -> None:
        self.write(handle, offset, src)

    def read(self, handle: int, offset: int, nbytes: int) -> bytes:
        arr, size, _ = lookup(self._bufs, handle, self.tenant_id)
        check_span(handle, size, offset, nbytes)
        return arr[offset : offset + nbytes].tobytes()

    def read_into(self, handle: int, offset: int, out: memoryview) -> None:
        arr, size, _ = lookup(self._bufs, handle, self.tenant_id)
        dst = np.frombuffer(out, dtype=np.uint8)  # raises on a read-only view
        check_span(handle, size, offset, dst.size)
        dst[:] = arr[offset : offset + dst.size]

    def launch(
        self,
        kernel: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[KernelArg],
        shared_mem_bytes: int = 0,
    ) -> None:
        if self._closed:
            raise closed(self.tenant_id)
        sig = BUILTIN_SIGNATURES.get(kernel) or self._ptx.get(kernel)
        if sig is None:
            raise InvalidKernelLaunch(
                f"unknown kernel {kernel!r}", kernel=kernel, known=sorted([*BUILTIN_SIGNATURES, *self._ptx])
            )
        values = validate_launch(sig, grid, block, args, shared_mem_bytes, self._limits, self._bufs)
        twin = NUMPY_TWINS.get(kernel)
        if twin is None:
            raise InvalidKernelLaunch(f"tenant PTX kernel {kernel!r} needs the cuda backend", kernel=kernel)
        twin([self._bufs[int(v)][0] if p == "ptr" else v for p, v in zip(sig.params, values, strict=True)])

    def sync(self) -> None:
        if self._closed:
            raise closed(self.tenant_id)

    def buffers(self) -> dict[int, int]:
        return {h: b[1] for h, b in list(self._bufs.items())}

    def restore_buffers(self, sizes: Mapping[int, int]) -> None:
        wanted = check_restore_sizes(sizes)
        probe = GpuCap(self._cap.limit, self._cap.granularity)
        probe.reserve_all(wanted.values())  # refuses before anything is freed
        self._release_all()
        charges = self._cap.reserve_all(wanted.values())
        made = self._make_buffers(wanted, charges, dict(zip(wanted, wanted, strict=True)))
        self._bufs.update(made)
        self._ids = itertools.count(max(wanted, default=0) + 1)

    def stage_restore(self, sizes: Mapping[int, int]) -> dict[int, int]:
        wanted = check_restore_sizes(sizes)
        if self._closed:
            raise closed(self.tenant_id)
        charges = self._cap.reserve_all(wanted.values())  # beside the live buffers; refused as a whole
        staged = {handle: next(self._ids) for handle in wanted}
        made = self._make_buffers(wanted, charges, staged)
        self._bufs.update(made)
        return staged

    def _make_buffers(
        self, wanted: Mapping[int, int], charges: Sequence[int], keys: Mapping[int, int]
    ) -> dict[int, _Buf]:
        """Host buffers for reserved `charges`, keyed by `keys[handle]`; all or nothing: if host
        memory runs out part way, every charge goes back and the caller's state is untouched."""
        made: dict[int, _Buf] = {}
        try:
            for (handle, size), charged in zip(wanted.items(), charges, strict=True):
                made[keys[handle]] = (np.zeros(size, dtype=np.uint8), size, charged)
        except BaseException as exc:
            made.clear()
            self._cap.release(sum(charges))
            if isinstance(exc, MemoryError | ValueError):
                metrics.count_gpu_refusal(self.tenant_id, "host")
                total = sum(charges)
                raise GpuMemoryExhausted(
                    requested=total, limit=self._cap.limit or 0, current=self._cap.current
                ) from None
            raise
        return made

    def publish_restore(self, staged: Mapping[int, int]) -> None:
        if self._closed:
            raise closed(self.tenant_id)
        keep = set(staged.values())
        for handle in [h for h in self._bufs if h not in keep]:
            self._cap.release(self._bufs.pop(handle)[2])
        # Pop every temporary first: a snapshot handle may equal another entry's temporary handle.
        moved = {handle: self._bufs.pop(temp) for handle, temp in staged.items()}
        self._bufs.update(moved)
        self._ids = itertools.count(max(moved, default=0) + 1)

    def word_sums(self, handles: Sequence[int], chunk: int) -> list[list[int]]:
        out = []
        for handle in handles:
            arr, size, _ = lookup(self._bufs, handle, self.tenant_id)
            out.append(chunk_word_sums(memoryview(arr.data)[:size], chunk))
        return out

    def clone_buffers(self) -> _CpuClone | None:
        if self._closed:
            raise closed(self.tenant_id)
        return _CpuClone({h: arr.copy() for h, (arr, _, _) in self._bufs.items()})

    def usage(self) -> TenantUsage:
        return TenantUsage(self.tenant_id, self._cap.current, self.cap_bytes)

    def _release_all(self) -> None:
        for handle in list(self._bufs):
            buf = self._bufs.pop(handle, None)
            if buf is not None:
                self._cap.release(buf[2])

    def close(self) -> None:
        self._release_all()
        self._closed = True


class _CpuClone:
    """Copies of a tenant's buffers (the CUDA backend copies device to device)."""

    def __init__(self, arrays: dict[int, npt.NDArray[np.uint8]]) -> None:
        self._arrays = arrays

    def read_into(self, handle: int, out: memoryview) -> None:
        arr = lookup(self._arrays, handle, "clone")
        np.frombuffer(out, dtype=np.uint8)[: arr.size] = arr

    def close(self) -> None:
        self._arrays.clear()


class CpuAccelerator:
    """numpy backend; `fallback_reason` says why auto mode chose it (empty when asked for)."""

    name = "cpu"

    def __init__(self, granularity: int = DEFAULT_GRANULARITY, fallback_reason: str = "") -> None:
        self.granularity = granularity
        self.fallback_reason = fallback_reason
        self.device_name = "cpu"
        self._tenants: dict[str, CpuTenantDevice] = {}
        self._lock = threading.Lock()
        self._pinned = bytearray()

    def open_tenant(
        self, tenant_id: str, cap_bytes: int | None, ptx_modules: Mapping[str, str] | None = None
    ) -> CpuTenantDevice:
        if not isinstance(tenant_id, str) or not tenant_id:
            raise BadRequest(f"tenant id must be a non-empty string, got {tenant_id!r}")
        ptx = {name: signature_from_ptx(name, src) for name, src in (ptx_modules or {}).items()}
        clash = sorted(set(ptx) & set(BUILTIN_SIGNATURES))
        if clash:
            raise BadRequest(f"tenant kernels {clash} shadow built-in kernels", kernels=clash)
        with self._lock:
            if tenant_id in self._tenants:
                raise BadRequest(f"tenant {tenant_id!r} already has a device", tenant=tenant_id)
            dev = CpuTenantDevice(tenant_id, cap_bytes, self.granularity, ptx)
            self._tenants[tenant_id] = dev
        return dev

    def close_tenant(self, tenant_id: str) -> None:
        with self._lock:
            dev = self._tenants.pop(tenant_id, None)
        if dev is not None:
            dev.close()

    def memory_info(self) -> tuple[int, int]:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    def health(self) -> AcceleratorHealth:
        return AcceleratorHealth(ok=True, mps=mps.current_mode())

    def pinned_buffer(self, nbytes: int) -> memoryview:
        if type(nbytes) is not int or nbytes < 0:
            raise BadRequest(f"staging size must be a non-negative integer, got {nbytes!r}")
        with self._lock:
            if len(self._pinned) < nbytes:
                self._pinned = bytearray(nbytes)
            return memoryview(self._pinned)[:nbytes]

    def host_region(self, nbytes: int) -> memoryview:
        if type(nbytes) is not int or nbytes < 0:
            raise BadRequest(f"host region size must be a non-negative integer, got {nbytes!r}")
        # An anonymous mapping: pages cost memory only once written, so an idle hot tier sized to
        # its budget does not count against the pod's memory limit (bytearray() zeroes every page).
        return memoryview(mmap.mmap(-1, max(nbytes, 1)))[:nbytes]

    def usage(self) -> list[TenantUsage]:
        with self._lock:
            devices = list(self._tenants.values())
        return [d.usage() for d in devices]

    def close(self) -> None:
        with self._lock:
            ids = list(self._tenants)
        for tenant_id in ids:
            self.close_tenant(tenant_id)
