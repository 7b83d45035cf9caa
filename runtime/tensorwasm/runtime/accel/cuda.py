"""The CUDA backend: the only module importing cuda.bindings (driver and NVRTC).

Owns `CudaAccelerator` (one per device) and `CudaTenantDevice` (one per tenant: a cuMemPool with
maxSize = cap and release threshold = cap, a non-blocking stream, the tenant's PTX modules).

Threading: one owner thread per device retains the primary context and performs every setup and
teardown call (init, NVRTC, module loads, pool/stream create/destroy, pinned host memory, close).
The hot path (alloc/free, copies, launch, sync) runs inline on the caller's thread with the primary
context made current once per thread: a hop to the owner thread costs tens of microseconds of queue
and wake-up, ten times a pool alloc+free (see docs/gpu-validation.md for the measurement). Every
call a tenant makes is ordered on its own stream, so no cross-thread ordering is needed.

Sticky errors (illegal address, launch failure, ...) poison the context: every later call raises
AcceleratorFailed and `health()` reports not ok, so the shard fails readiness and is restarted.
Must not import wasmtime, aiohttp or pynvml.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import numpy as np
from cuda.bindings import driver as cu
from cuda.bindings import nvrtc

from tensorwasm.runtime import metrics
from tensorwasm.runtime.accel import mps
from tensorwasm.runtime.accel.base import AcceleratorHealth, KernelArg, TenantUsage
from tensorwasm.runtime.accel.buffers import check_restore_sizes, check_span, closed, lookup
from tensorwasm.runtime.accel.kernels import BUILTIN_SIGNATURES, CUDA_SOURCE, KernelSignature
from tensorwasm.runtime.accel.launch import LaunchLimits, signature_from_ptx, validate_launch
from tensorwasm.runtime.errors import (
    AcceleratorFailed,
    BadRequest,
    GpuMemoryExhausted,
    InvalidKernelLaunch,
    ModuleRejected,
)
from tensorwasm.runtime.tenancy.gpucap import GpuCap

log = logging.getLogger(__name__)
T = TypeVar("T")

_R = cu.CUresult
_OOM = _R.CUDA_ERROR_OUT_OF_MEMORY
_NO_CONTEXT = _R.CUDA_ERROR_INVALID_CONTEXT
_STICKY = frozenset(
    getattr(_R, n)
    for n in (
        "CUDA_ERROR_ILLEGAL_ADDRESS",
        "CUDA_ERROR_LAUNCH_FAILED",
        "CUDA_ERROR_HARDWARE_STACK_ERROR",
        "CUDA_ERROR_ILLEGAL_INSTRUCTION",
        "CUDA_ERROR_MISALIGNED_ADDRESS",
        "CUDA_ERROR_INVALID_ADDRESS_SPACE",
        "CUDA_ERROR_INVALID_PC",
        "CUDA_ERROR_ASSERT",
        "CUDA_ERROR_ECC_UNCORRECTABLE",
        "CUDA_ERROR_LAUNCH_TIMEOUT",
        "CUDA_ERROR_CONTEXT_IS_DESTROYED",
    )
    if hasattr(_R, n)
)
_alloc_async = cu.cuMemAllocFromPoolAsync
_free_async = cu.cuMemFreeAsync
_htod_async = cu.cuMemcpyHtoDAsync
_dtod_async = cu.cuMemcpyDtoDAsync
_dtoh_async = cu.cuMemcpyDtoHAsync
_stream_sync = cu.cuStreamSynchronize
_launch_kernel = cu.cuLaunchKernel
# ctypes per parameter class; ctypes wraps an i32/i64 value into a b32/b64 slot bit for bit.
_CTYPES: dict[str, Any] = {
    "ptr": ctypes.c_uint64,
    "b64": ctypes.c_uint64,
    "u64": ctypes.c_uint64,
    "i64": ctypes.c_int64,
    "b32": ctypes.c_uint32,
    "u32": ctypes.c_uint32,
    "i32": ctypes.c_int32,
    "f32": ctypes.c_float,
    "f64": ctypes.c_double,
}
_NVRTC_OPTIONS = (b"-default-device", b"-std=c++17", b"--use_fast_math")
SCRATCH_KEEP_BYTES = 1 << 30
_MAX_GRID_Y = 65535
_WORD_SUM_CTYPES = (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64)


def error_name(err: Any) -> str:
    return str(getattr(err, "name", err))


def default_cache_dir() -> Path:
    env = os.environ.get("TENSORWASM_RUNTIME_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tensorwasm" / "kernels"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _Owner:
    """The device's owner thread: runs submitted callables one at a time, with the context current."""

    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._q.get()) is not None:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:
                    fut.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future[T] = Future()
        self._q.put((fn, fut))
        return fut.result()

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)


@dataclass(frozen=True)
class _Kernel:
    sig: KernelSignature
    func: Any  # CUfunction
    limits: LaunchLimits
    ctypes: tuple[Any, ...]


# A buffer: (CUdeviceptr, size asked for, charged bytes = bytes taken from the pool)
_Buf = tuple[Any, int, int]


class CudaTenantDevice:
    """One tenant on the GPU: its own capped pool, stream, PTX kernels and handle table."""

    def __init__(
        self,
        acc: CudaAccelerator,
        tenant_id: str,
        cap_bytes: int | None,
        pool: Any,
        stream: Any,
        kernels: dict[str, _Kernel],
        modules: list[Any],
    ) -> None:
        self.tenant_id = tenant_id
        self.cap_bytes = cap_bytes
        self._acc = acc
        self._tls = acc.tls
        self._ready = True  # False once closed or once the context is poisoned: one check per call
        self._cap = GpuCap(cap_bytes, acc.granularity)
        self._pool = pool
        self._stream = stream
        self._kernels = kernels
        self._modules = modules
        self._bufs: dict[int, _Buf] = {}
        self._ids = itertools.count(1)
        self._inflight: list[memoryview] = []  # sources of write_async kept alive until sync()
        self._closed = False

    # -- diagnostics used by tests, metrics and benchmarks --
    @property
    def pool(self) -> Any:
        return self._pool

    @property
    def stream(self) -> Any:
        return self._stream

    @property
    def cap(self) -> GpuCap:
        return self._cap

    def pool_usage(self) -> tuple[int, int]:
        """(reserved, used) bytes of this tenant's pool as the driver reports them."""
        self._acc.bind_thread()
        attrs = cu.CUmemPool_attribute
        err, reserved = cu.cuMemPoolGetAttribute(self._pool, attrs.CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
        err2, used = cu.cuMemPoolGetAttribute(self._pool, attrs.CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
        if err or err2:
            self._acc.fail(err or err2, "cuMemPoolGetAttribute")
        return int(reserved), int(used)

    def usage(self) -> TenantUsage:
        reserved: int | None = None
        if not self._closed and self._acc.poison_reason == "":
            try:
                reserved = self.pool_usage()[0]
            except AcceleratorFailed:
                reserved = None
        return TenantUsage(self.tenant_id, self._cap.current, self.cap_bytes, reserved)

    def bytes_in_use(self) -> int:
        return self._cap.current

    # -- hot path: every line here is paid on each call (see bench/bench_gpu.py) --
    def _not_ready(self) -> NoReturn:
        if self._acc.poison_reason:
            raise AcceleratorFailed(self._acc.poison_reason)
        raise closed(self.tenant_id)

    def _enter(self) -> None:
        if not self._ready:
            self._not_ready()
        try:
            self._tls.bound  # noqa: B018 - set once per thread by bind_thread()
        except AttributeError:
            self._acc.bind_thread()

    def alloc(self, nbytes: int) -> int:
        # No per-call context check: a thread without the context current gets INVALID_CONTEXT from the
        # driver once, binds, and retries (in _alloc_retry / _free_retry).
        if not self._ready:
            self._not_ready()
        try:
            charged = self._cap.reserve(nbytes)
        except GpuMemoryExhausted:
            metrics.count_gpu_refusal(self.tenant_id, "host")
            raise
        # Ask the pool for whole pages: the driver's used bytes then equal the host counter exactly.
        try:
            err, dptr = _alloc_async(charged, self._pool, self._stream)
        except BaseException:
            self._cap.release(charged)  # the binding raised instead of answering an error code
            raise
        if err:
            dptr = self._alloc_retry(charged, err)
        handle = next(self._ids)
        self._bufs[handle] = (dptr, nbytes, charged)
        return handle

    def _alloc_retry(self, charged: int, err: Any, release: bool = True) -> Any:
        """The driver refused although the host counter had room: fragmentation inside the pool.
        Trim the pool's idle reservations and try once more before refusing."""
        try:
            if err == _NO_CONTEXT:
                self._acc.bind_thread()
                err, dptr = _alloc_async(charged, self._pool, self._stream)
                if not err:
                    return dptr
            if err == _OOM:
                self._acc.check(_stream_sync(self._stream)[0], "cuStreamSynchronize")
                self._acc.check(cu.cuMemPoolTrimTo(self._pool, 0)[0], "cuMemPoolTrimTo")
                err, dptr = _alloc_async(charged, self._pool, self._stream)
                if not err:
                    return dptr
        except BaseException:  # AcceleratorFailed, or the binding itself raising
            if release:
                self._cap.release(charged)
            raise
        if release:
            self._cap.release(charged)
        if err == _OOM:
            metrics.count_gpu_refusal(self.tenant_id, "driver")
            limit = self.cap_bytes if self.cap_bytes is not None else self._acc.memory_info()[1]
            raise GpuMemoryExhausted(requested=charged, limit=limit, current=self._cap.current)
        self._acc.fail(err, "cuMemAllocFromPoolAsync")

    def free(self, handle: int) -> None:
        if not self._ready:
            self._not_ready()
        try:
            buf = self._bufs.pop(handle)
        except (KeyError, TypeError):
            lookup(self._bufs, handle, self.tenant_id)  # raises the clear error
            raise
        (err,) = _free_async(buf[0], self._stream)
        # Later allocations of this tenant are ordered after the free on the same stream: the bytes can
        # be counted as returned now.
        self._cap.release(buf[2])
        if err:
            if err == _NO_CONTEXT:
                self._acc.bind_thread()
                (err,) = _free_async(buf[0], self._stream)
            if err:
                self._acc.fail(err, "cuMemFreeAsync")

    def _host_address(self, data: Any, writable: bool) -> tuple[int, int]:
        try:
            arr = np.frombuffer(data, dtype=np.uint8)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"host buffer must be a contiguous bytes-like object: {exc}") from None
        if writable and not arr.flags.writeable:
            raise BadRequest("read_into needs a writable buffer")
        return int(arr.ctypes.data), int(arr.size)

    def write(self, handle: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.write_async(handle, offset, data)  # type: ignore[arg-type]
        self.sync()

    def write_async(self, handle: int, offset: int, src: memoryview) -> None:
        self._enter()
        buf = lookup(self._bufs, handle, self.tenant_id)
        addr, n = self._host_address(src, writable=False)
        check_span(handle, buf[1], offset, n)
        if n == 0:
            return
        self._inflight.append(src)
        (err,) = _htod_async(int(buf[0]) + offset, addr, n, self._stream)
        if err:
            self._acc.fail(err, "cuMemcpyHtoDAsync")

    def read(self, handle: int, offset: int, nbytes: int) -> bytes:
        out = bytearray(nbytes) if type(nbytes) is int and nbytes >= 0 else None
        if out is None:
            raise BadRequest(f"read length must be a non-negative integer, got {nbytes!r}")
        self.read_into(handle, offset, memoryview(out))
        return bytes(out)

    def read_into(self, handle: int, offset: int, out: memoryview) -> None:
        self._enter()
        buf = lookup(self._bufs, handle, self.tenant_id)
        addr, n = self._host_address(out, writable=True)
        check_span(handle, buf[1], offset, n)
        if n == 0:
            return
        (err,) = _dtoh_async(addr, int(buf[0]) + offset, n, self._stream)
        if err:
            self._acc.fail(err, "cuMemcpyDtoHAsync")
        self.sync()

    def launch(
        self,
        kernel: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[KernelArg],
        shared_mem_bytes: int = 0,
    ) -> None:
        self._enter()
        k = self._kernels.get(kernel)
        if k is None:
            raise InvalidKernelLaunch(
                f"unknown kernel {kernel!r}", kernel=kernel, known=sorted(self._kernels)
            )
        bufs = self._bufs
        values = validate_launch(k.sig, grid, block, args, shared_mem_bytes, k.limits, bufs)
        params = values  # a fresh list: buffer handles become device addresses in place
        for i, arg in enumerate(args):
            if arg.kind == "buffer":
                params[i] = int(bufs[params[i]][0])  # type: ignore[index]
        (err,) = _launch_kernel(
            k.func, grid[0], grid[1], grid[2], block[0], block[1], block[2],
            shared_mem_bytes, self._stream, (tuple(params), k.ctypes), 0,
        )  # fmt: skip
        if err:
            if err in _STICKY:
                self._acc.fail(err, f"launch of {kernel}")
            raise InvalidKernelLaunch(
                f"driver refused the launch of {kernel}: {error_name(err)}", kernel=kernel
            )

    def sync(self) -> None:
        self._enter()
        (err,) = _stream_sync(self._stream)
        self._inflight.clear()
        if err:
            self._acc.fail(err, "cuStreamSynchronize")

    def buffers(self) -> dict[int, int]:
        return {h: b[1] for h, b in list(self._bufs.items())}

    def restore_buffers(self, sizes: Mapping[int, int]) -> None:
        """Free everything, then recreate exactly `sizes` (same handles) under the cap, all or nothing."""
        wanted = check_restore_sizes(sizes)
        GpuCap(self._cap.limit, self._cap.granularity).reserve_all(wanted.values())  # refuse before freeing
        self._enter()
        self._free_all()
        charges = self._cap.reserve_all(wanted.values())
        made: list[int] = []
        try:
            for (handle, size), charged in zip(wanted.items(), charges, strict=True):
                err, dptr = _alloc_async(charged, self._pool, self._stream)
                if err:
                    dptr = self._alloc_retry(charged, err, release=False)
                self._bufs[handle] = (dptr, size, charged)
                made.append(handle)
        except BaseException:
            for handle in made:
                self._acc.check_cleanup(
                    _free_async(self._bufs.pop(handle)[0], self._stream)[0], "cuMemFreeAsync"
                )
            self._cap.release(sum(charges))
            raise
        self._ids = itertools.count(max(wanted, default=0) + 1)

    def stage_restore(self, sizes: Mapping[int, int]) -> dict[int, int]:
        wanted = check_restore_sizes(sizes)
        self._enter()
        charges = self._cap.reserve_all(wanted.values())  # beside the live buffers; refused as a whole
        staged: dict[int, int] = {}
        try:
            for (handle, size), charged in zip(wanted.items(), charges, strict=True):
                err, dptr = _alloc_async(charged, self._pool, self._stream)
                if err:
                    dptr = self._alloc_retry(charged, err, release=False)
                temp = next(self._ids)
                self._bufs[temp] = (dptr, size, charged)
                staged[handle] = temp
        except BaseException:
            for temp in staged.values():
                self._acc.check_cleanup(
                    _free_async(self._bufs.pop(temp)[0], self._stream)[0], "cuMemFreeAsync"
                )
            self._cap.release(sum(charges))
            raise
        return staged

    def publish_restore(self, staged: Mapping[int, int]) -> None:
        self._enter()
        keep = set(staged.values())
        for handle in [h for h in self._bufs if h not in keep]:
            buf = self._bufs.pop(handle)
            self._acc.check(_free_async(buf[0], self._stream)[0], "cuMemFreeAsync")
            self._cap.release(buf[2])
        # Pop every temporary first: a snapshot handle may equal another entry's temporary handle.
        moved = {handle: self._bufs.pop(temp) for handle, temp in staged.items()}
        self._bufs.update(moved)
        self._ids = itertools.count(max(moved, default=0) + 1)

    def word_sums(self, handles: Sequence[int], chunk: int) -> list[list[int]]:
        """One scratch array, one kernel per buffer on the tenant's stream, one copy back, one sync."""
        if type(chunk) is not int or chunk <= 0 or chunk % 8:
            raise BadRequest(f"word-sum chunk must be a positive multiple of 8 bytes, got {chunk!r}")
        self._enter()
        bufs = [lookup(self._bufs, h, self.tenant_id) for h in handles]
        counts = [-(-size // chunk) for _, size, _ in bufs]
        if any(c > _MAX_GRID_Y for c in counts):
            raise BadRequest(f"a buffer has more than {_MAX_GRID_Y} chunks of {chunk} bytes")
        total = sum(counts)
        if not total:
            return [[] for _ in bufs]
        out = self._acc.scratch_alloc(total * 8, self._stream)
        if out is None:
            raise GpuMemoryExhausted(requested=total * 8, limit=0, current=0)
        host = np.empty(total, dtype=np.uint64)
        check = self._acc.check
        try:
            check(cu.cuMemsetD8Async(out, 0, total * 8, self._stream)[0], "cuMemsetD8Async")
            at = 0
            blocks = max(1, min(64, chunk // (8 * 256 * 16)))  # about 16 words a thread
            for (dptr, size, _), count in zip(bufs, counts, strict=True):
                if count:
                    params = ((int(dptr), size, chunk, out + at * 8), _WORD_SUM_CTYPES)
                    err = _launch_kernel(self._acc.word_sum_kernel, blocks, count, 1, 256, 1, 1, 0,
                                         self._stream, params, 0)[0]  # fmt: skip
                    check(err, "cuLaunchKernel (tw_chunk_word_sums)")
                at += count
            check(_dtoh_async(int(host.ctypes.data), out, total * 8, self._stream)[0], "cuMemcpyDtoHAsync")
            check(_stream_sync(self._stream)[0], "cuStreamSynchronize")
        finally:
            self._acc.scratch_free(out)
        sums, at = [], 0
        for count in counts:
            sums.append([int(x) for x in host[at : at + count]])
            at += count
        return sums

    def clone_buffers(self) -> _CudaClone | None:
        """Device-to-device copies into the accelerator's scratch pool, synced: the tenant may resume
        as soon as this returns (a D2D copy runs at HBM speed, the D2H of the clone happens later)."""
        self._enter()
        bufs = list(self._bufs.items())
        total = sum(charged for _, (_, _, charged) in bufs)
        if not total:
            return None
        base = self._acc.scratch_alloc(total, self._stream)
        if base is None:
            return None
        where: dict[int, tuple[int, int]] = {}
        at = 0
        try:
            for handle, (dptr, size, charged) in bufs:
                self._acc.check(_dtod_async(base + at, dptr, size, self._stream)[0], "cuMemcpyDtoDAsync")
                where[handle] = (base + at, size)
                at += charged
            self._acc.check(_stream_sync(self._stream)[0], "cuStreamSynchronize")
        except BaseException:
            self._acc.scratch_free(base)
            raise
        return _CudaClone(self._acc, base, where)

    def _free_all(self) -> None:
        for handle in list(self._bufs):
            buf = self._bufs.pop(handle, None)
            if buf is not None:
                self._acc.check(_free_async(buf[0], self._stream)[0], "cuMemFreeAsync")
                self._cap.release(buf[2])

    def teardown(self) -> None:
        """Owner thread: free every buffer, destroy the stream, the pool and the tenant's modules."""
        self._closed = True
        self._ready = False
        if self._acc.poison_reason:  # the context is gone; the driver frees everything at process exit
            self._bufs.clear()
            return
        # Every step runs even when one fails (the rest still frees what it can); the first failure
        # is raised at the end, naming its call.
        failed: list[tuple[Any, str]] = []

        def step(result: Any, what: str) -> None:
            err = result[0] if isinstance(result, tuple) else result
            if err:
                failed.append((err, what))

        step(_stream_sync(self._stream), "cuStreamSynchronize")
        for handle in list(self._bufs):
            buf = self._bufs.pop(handle)
            step(_free_async(buf[0], self._stream), "cuMemFreeAsync")
            self._cap.release(buf[2])
        step(_stream_sync(self._stream), "cuStreamSynchronize")
        self._inflight.clear()
        step(cu.cuStreamDestroy(self._stream), "cuStreamDestroy")
        step(cu.cuMemPoolDestroy(self._pool), "cuMemPoolDestroy")
        for module in self._modules:
            step(cu.cuModuleUnload(module), "cuModuleUnload")
        if failed:
            self._acc.fail(*failed[0])


class _CudaClone:
    """A tenant's buffers frozen in one scratch allocation; read back on the accelerator's copy stream."""

    def __init__(self, acc: CudaAccelerator, base: int, where: dict[int, tuple[int, int]]) -> None:
        self._acc, self._base, self._where = acc, base, where

    def read_into(self, handle: int, out: memoryview) -> None:
        dptr, size = lookup(self._where, handle, "clone")
        arr = np.frombuffer(out, dtype=np.uint8)
        if arr.size < size or not arr.flags.writeable:
            raise BadRequest(f"clone read of buffer {handle} needs {size} writable bytes")
        self._acc.copy_to_host(int(arr.ctypes.data), dptr, size)

    def close(self) -> None:
        if self._base:
            self._acc.scratch_free(self._base)
            self._base = 0


class CudaAccelerator:
    """One device: owner thread, primary context, built-in kernels, tenant pools."""

    name = "cuda"

    def __init__(self, device: int = 0, cache_dir: Path | None = None) -> None:
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.fallback_reason = ""
        self.poison_reason = ""
        self.tls = threading.local()
        self._tenants: dict[str, CudaTenantDevice] = {}
        self._lock = threading.Lock()
        self._pinned: list[tuple[int, memoryview]] = []
        self._regions: list[tuple[int, memoryview]] = []
        self._owner = _Owner(f"tensorwasm-cuda-{device}")
        try:
            self._owner.call(self._init)
        except BaseException:
            self._owner.stop()
            raise

    # -- owner-thread setup --
    def check(self, err: Any, what: str) -> None:
        """Raise AcceleratorFailed naming `what` when a driver call returned an error."""
        if err:
            self.fail(err, what)

    _check = check

    def check_cleanup(self, err: Any, what: str) -> None:
        """A cleanup call's code, checked without masking the exception already being raised."""
        if err:
            try:
                self.fail(err, what)
            except AcceleratorFailed as exc:
                log.error("Failed CUDA cleanup call=%s message=%s", what, exc.message)

    def _init(self) -> None:
        (err,) = cu.cuInit(0)
        self._check(err, "cuInit")
        err, count = cu.cuDeviceGetCount()
        self._check(err, "cuDeviceGetCount")
        if not 0 <= self.device < count:
            raise AcceleratorFailed(f"CUDA device {self.device} does not exist ({count} visible)")
        err, self._dev = cu.cuDeviceGet(self.device)
        self._check(err, "cuDeviceGet")
        err, self._ctx = cu.cuDevicePrimaryCtxRetain(self._dev)
        self._check(err, "cuDevicePrimaryCtxRetain")
        self.bind_thread()
        a = cu.CUdevice_attribute
        attr = self._attr
        if not attr(a.CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED):
            raise AcceleratorFailed(f"CUDA device {self.device} does not support memory pools")
        self.compute_capability = (
            attr(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            attr(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        )
        self.device_limits = LaunchLimits(
            max_grid=(
                attr(a.CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X),
                attr(a.CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y),
                attr(a.CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z),
            ),
            max_block=(
                attr(a.CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X),
                attr(a.CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y),
                attr(a.CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z),
            ),
            max_threads_per_block=attr(a.CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK),
            max_dynamic_shared=attr(a.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK),
        )
        err, name = cu.cuDeviceGetName(128, self._dev)
        self.device_name = name.split(b"\0", 1)[0].decode() if not err else f"cuda:{self.device}"
        err, self.driver_version = cu.cuDriverGetVersion()
        self._check(err, "cuDriverGetVersion")
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.device
        err, gran = cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        )
        self._check(err, "cuMemGetAllocationGranularity")
        self.granularity = int(gran)
        err, self._probe_stream = cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING)
        self._check(err, "cuStreamCreate")
        # Snapshot copies off a tenant's own stream (a clone read back while the tenant runs again).
        err, self._copy_stream = cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING)
        self._check(err, "cuStreamCreate")
        self._copy_lock = threading.Lock()
        self._scratch_pool: Any = None
        module = self._load_image(self._builtin_cubin(), "built-in kernels")
        self._builtins = {name: self._kernel(module, sig) for name, sig in BUILTIN_SIGNATURES.items()}
        err, self.word_sum_kernel = cu.cuModuleGetFunction(module, b"tw_chunk_word_sums")
        self._check(err, "cuModuleGetFunction (tw_chunk_word_sums)")
        log.info(
            "Initialised CUDA accelerator device=%d name=%r cc=%s driver=%s granularity=%d",
            self.device, self.device_name, self.compute_capability, self.driver_version, self.granularity,
        )  # fmt: skip

    def _attr(self, attribute: Any) -> int:
        err, value = cu.cuDeviceGetAttribute(attribute, self._dev)
        self._check(err, f"cuDeviceGetAttribute({error_name(attribute)})")
        return int(value)

    def _arch(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    def _builtin_cubin(self) -> bytes:
        """NVRTC-compile the built-in library once per (source, arch, NVRTC version); cached on disk.
        Without NVRTC (the image ships none; the NVIDIA container runtime mounts only the driver), the
        driver links the PTX generated from the same source (accel/builtins_ptx.py), as for tenant PTX."""
        try:
            err, major, minor = nvrtc.nvrtcVersion()
        except Exception as exc:  # the library is loaded on first use: DynamicLibNotFoundError, OSError
            return self._builtin_cubin_from_ptx(exc)
        if err:
            raise AcceleratorFailed(f"nvrtcVersion failed: {error_name(err)}")
        opts = (f"--gpu-architecture={self._arch()}".encode(), *_NVRTC_OPTIONS)
        key = hashlib.sha256(CUDA_SOURCE.encode() + repr((opts, major, minor)).encode()).hexdigest()[:32]
        path = self.cache_dir / f"builtin-{key}.cubin"
        if path.is_file():
            return bytes(path.read_bytes())
        err, prog = nvrtc.nvrtcCreateProgram(CUDA_SOURCE.encode(), b"tensorwasm_builtins.cu", 0, [], [])
        if err:
            raise AcceleratorFailed(f"nvrtcCreateProgram failed: {error_name(err)}")
        try:
            (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), list(opts))
            if err:
                log_err, size = nvrtc.nvrtcGetProgramLogSize(prog)
                text = b" " * size
                if not log_err:
                    log_err = nvrtc.nvrtcGetProgramLog(prog, text)[0]
                detail = text.decode(errors="replace") if not log_err else f"(no log: {error_name(log_err)})"
                raise AcceleratorFailed(
                    f"nvrtcCompileProgram failed on the built-in kernels ({error_name(err)}): {detail}"
                )
            err, size = nvrtc.nvrtcGetCUBINSize(prog)
            if err:
                raise AcceleratorFailed(f"nvrtcGetCUBINSize failed: {error_name(err)}")
            cubin: bytes = b" " * int(size)
            (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
            if err:
                raise AcceleratorFailed(f"nvrtcGetCUBIN failed: {error_name(err)}")
        finally:
            (derr,) = nvrtc.nvrtcDestroyProgram(prog)
            if derr:
                log.error("Failed NVRTC cleanup call=nvrtcDestroyProgram error=%s", error_name(derr))
        _write_atomic(path, cubin)
        log.info("Compiled built-in kernels arch=%s cache=%s", self._arch(), path)
        return cubin

    def _builtin_cubin_from_ptx(self, why: BaseException) -> bytes:
        from tensorwasm.runtime.accel import builtins_ptx

        if hashlib.sha256(CUDA_SOURCE.encode()).hexdigest() != builtins_ptx.SOURCE_SHA256:
            raise AcceleratorFailed(f"NVRTC unavailable ({why}) and the shipped PTX is stale")
        try:
            cubin = self._ptx_cubin("builtins", builtins_ptx.PTX)
        except ModuleRejected as exc:
            raise AcceleratorFailed(
                f"NVRTC unavailable ({why}) and the driver refused the shipped PTX: {exc}"
            ) from exc
        log.info("Built-in kernels linked from the shipped PTX (no NVRTC: %s) arch=%s", why, self._arch())
        return cubin

    def _ptx_cubin(self, kernel: str, ptx: str) -> bytes:
        """Link tenant PTX to a cubin once per (PTX, arch, driver); the JIT never runs on an invoke."""
        data = ptx.encode()
        key = hashlib.sha256(data + f"{self._arch()}:{self.driver_version}".encode()).hexdigest()
        path = self.cache_dir / f"ptx-{key}.cubin"
        if path.is_file():
            return bytes(path.read_bytes())
        err, state = cu.cuLinkCreate(0, [], [])
        self._check(err, "cuLinkCreate")
        try:
            (err,) = cu.cuLinkAddData(
                state, cu.CUjitInputType.CU_JIT_INPUT_PTX, data + b"\0", len(data) + 1,
                f"{kernel}.ptx".encode(), 0, [], [],
            )  # fmt: skip
            if err:
                raise ModuleRejected(
                    f"PTX of kernel {kernel!r} does not compile: {error_name(err)}", kernel=kernel
                )
            err, image, size = cu.cuLinkComplete(state)
            if err:
                raise ModuleRejected(
                    f"PTX of kernel {kernel!r} does not link: {error_name(err)}", kernel=kernel
                )
            cubin = ctypes.string_at(int(image), int(size))
        finally:
            self.check_cleanup(cu.cuLinkDestroy(state)[0], "cuLinkDestroy")
        _write_atomic(path, cubin)
        return cubin

    def _load_image(self, image: bytes, what: str) -> Any:
        err, module = cu.cuModuleLoadData(image)
        self._check(err, f"loading {what}")
        return module

    def _kernel(self, module: Any, sig: KernelSignature) -> _Kernel:
        err, func = cu.cuModuleGetFunction(module, sig.name.encode())
        if err:
            raise ModuleRejected(f"kernel {sig.name!r} not found in its module: {error_name(err)}")
        fa = cu.CUfunction_attribute
        limits = self.device_limits
        err, max_threads = cu.cuFuncGetAttribute(fa.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, func)
        err2, static_smem = cu.cuFuncGetAttribute(fa.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, func)
        err3, max_dynamic = cu.cuFuncGetAttribute(fa.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, func)
        self._check(err or err2 or err3, "cuFuncGetAttribute")
        fn_limits = LaunchLimits(
            max_grid=limits.max_grid,
            max_block=limits.max_block,
            max_threads_per_block=min(int(max_threads), limits.max_threads_per_block),
            max_dynamic_shared=max(0, min(int(max_dynamic), limits.max_dynamic_shared - int(static_smem))),
        )
        return _Kernel(sig, func, fn_limits, tuple(_CTYPES[p] for p in sig.params))

    # -- errors and health --
    def bind_thread(self) -> None:
        """Make the primary context current on the calling thread (once per thread)."""
        (err,) = cu.cuCtxSetCurrent(self._ctx)
        if err:
            raise AcceleratorFailed(f"cuCtxSetCurrent failed: {error_name(err)}")
        self.tls.bound = True

    def fail(self, err: Any, what: str) -> NoReturn:
        name = error_name(err)
        if err in _STICKY:
            if not self.poison_reason:
                self.poison_reason = f"{name} during {what} (context poisoned)"
                for dev in list(self._tenants.values()):
                    dev._ready = False
                log.error("Poisoned CUDA context device=%d reason=%r", self.device, self.poison_reason)
            raise AcceleratorFailed(self.poison_reason, cuda_error=name)
        raise AcceleratorFailed(f"{what} failed: {name}", cuda_error=name)

    def health(self) -> AcceleratorHealth:
        mode = mps.current_mode()
        if not self.poison_reason:
            # A sticky error from an async kernel nobody synchronised yet shows on any stream query.
            try:
                if not getattr(self.tls, "bound", False):
                    self.bind_thread()
                (err,) = cu.cuStreamQuery(self._probe_stream)
                if err and err != _R.CUDA_ERROR_NOT_READY:
                    self.fail(err, "cuStreamQuery (health probe)")
            except AcceleratorFailed:
                pass
        if self.poison_reason:
            return AcceleratorHealth(ok=False, reason=self.poison_reason, mps=mode)
        return AcceleratorHealth(ok=True, mps=mode)

    # -- tenants --
    def open_tenant(
        self, tenant_id: str, cap_bytes: int | None, ptx_modules: Mapping[str, str] | None = None
    ) -> CudaTenantDevice:
        if not isinstance(tenant_id, str) or not tenant_id:
            raise BadRequest(f"tenant id must be a non-empty string, got {tenant_id!r}")
        if cap_bytes is not None and (type(cap_bytes) is not int or cap_bytes < 0):
            raise BadRequest(f"GPU memory cap must be a non-negative integer, got {cap_bytes!r}")
        sigs = {name: signature_from_ptx(name, src) for name, src in (ptx_modules or {}).items()}
        clash = sorted(set(sigs) & set(BUILTIN_SIGNATURES))
        if clash:
            raise BadRequest(f"tenant kernels {clash} shadow built-in kernels", kernels=clash)
        if self.poison_reason:
            raise AcceleratorFailed(self.poison_reason)
        with self._lock:
            if tenant_id in self._tenants:
                raise BadRequest(f"tenant {tenant_id!r} already has a device", tenant=tenant_id)
            dev = self._owner.call(lambda: self._open(tenant_id, cap_bytes, ptx_modules or {}, sigs))
            self._tenants[tenant_id] = dev
        return dev

    def _open(
        self, tenant_id: str, cap: int | None, ptx: Mapping[str, str], sigs: Mapping[str, KernelSignature]
    ) -> CudaTenantDevice:
        kernels = dict(self._builtins)
        modules = []
        for name, sig in sigs.items():
            module = self._load_image(self._ptx_cubin(name, ptx[name]), f"PTX kernel {name}")
            modules.append(module)
            kernels[name] = self._kernel(module, sig)
        props = cu.CUmemPoolProps()
        props.allocType = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        props.handleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
        props.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        props.location.id = self.device
        g = self.granularity
        if cap is not None:
            # maxSize 0 would mean "unbounded": a cap under one page still gets one page.
            props.maxSize = max(g, -(-cap // g) * g)
        err, pool = cu.cuMemPoolCreate(props)
        self._check(err, "cuMemPoolCreate")
        # Keep freed memory mapped up to the cap (no trim and re-map on every sync); accounting-only
        # tenants keep up to the whole device.
        threshold = cu.cuuint64_t(props.maxSize if cap is not None else self.memory_info()[1])
        (err,) = cu.cuMemPoolSetAttribute(
            pool, cu.CUmemPool_attribute.CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, threshold
        )
        self._check(err, "cuMemPoolSetAttribute")
        err, stream = cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING)
        self._check(err, "cuStreamCreate")
        log.info("Opened GPU tenant tenant=%s cap=%s kernels=%d", tenant_id, cap, len(sigs))
        return CudaTenantDevice(self, tenant_id, cap, pool, stream, kernels, modules)

    def close_tenant(self, tenant_id: str) -> None:
        with self._lock:
            dev = self._tenants.pop(tenant_id, None)
        if dev is not None:
            self._owner.call(dev.teardown)
            log.info("Closed GPU tenant tenant=%s", tenant_id)

    def usage(self) -> list[TenantUsage]:
        with self._lock:
            devices = list(self._tenants.values())
        return [d.usage() for d in devices]

    def memory_info(self) -> tuple[int, int]:
        if not getattr(self.tls, "bound", False):
            self.bind_thread()
        err, free, total = cu.cuMemGetInfo()
        self._check(err, "cuMemGetInfo")
        return int(free), int(total)

    def pinned_buffer(self, nbytes: int) -> memoryview:
        """Page-locked staging, grown on demand and reused; earlier regions live until close()."""
        if type(nbytes) is not int or nbytes < 0:
            raise BadRequest(f"staging size must be a non-negative integer, got {nbytes!r}")
        with self._lock:
            if self._pinned and len(self._pinned[-1][1]) >= nbytes:
                return self._pinned[-1][1][:nbytes]
            size = max(nbytes, 2 * len(self._pinned[-1][1]) if self._pinned else 0, 1 << 20)

            def alloc() -> tuple[int, memoryview]:
                err, ptr = cu.cuMemHostAlloc(size, 0)
                self._check(err, "cuMemHostAlloc")
                view = memoryview((ctypes.c_ubyte * size).from_address(int(ptr))).cast("B")
                return int(ptr), view

            self._pinned.append(self._owner.call(alloc))
            return self._pinned[-1][1][:nbytes]

    def host_region(self, nbytes: int) -> memoryview:
        """Page-locked host memory of its own (the snapshot hot tier), freed at close()."""
        if type(nbytes) is not int or nbytes <= 0:
            raise BadRequest(f"host region size must be a positive integer, got {nbytes!r}")

        def alloc() -> tuple[int, memoryview]:
            err, ptr = cu.cuMemHostAlloc(nbytes, 0)
            self._check(err, "cuMemHostAlloc")
            return int(ptr), memoryview((ctypes.c_ubyte * nbytes).from_address(int(ptr))).cast("B")

        region = self._owner.call(alloc)
        with self._lock:
            self._regions.append(region)
        return region[1]

    # -- snapshot scratch: device-side clones outside every tenant's pool, freed after each capture --
    def scratch_alloc(self, nbytes: int, stream: Any) -> int | None:
        """`nbytes` of device memory ordered on `stream`, or None when the device has no room."""
        with self._lock:
            if self._scratch_pool is None:
                self._scratch_pool = self._owner.call(self._make_scratch_pool)
        err, dptr = cu.cuMemAllocFromPoolAsync(nbytes, self._scratch_pool, stream)
        if err == _OOM:
            return None
        self.check(err, "cuMemAllocFromPoolAsync (snapshot scratch)")
        return int(dptr)

    def scratch_free(self, dptr: int) -> None:
        self.check(_free_async(dptr, self._copy_stream)[0], "cuMemFreeAsync (snapshot scratch)")

    def _make_scratch_pool(self) -> Any:
        props = cu.CUmemPoolProps()
        props.allocType = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        props.handleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
        props.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        props.location.id = self.device
        err, pool = cu.cuMemPoolCreate(props)
        self._check(err, "cuMemPoolCreate (snapshot scratch)")
        # Keep up to this much mapped between captures: re-mapping 512 MiB costs more than copying it.
        (err,) = cu.cuMemPoolSetAttribute(
            pool, cu.CUmemPool_attribute.CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, cu.cuuint64_t(SCRATCH_KEEP_BYTES)
        )
        self._check(err, "cuMemPoolSetAttribute (snapshot scratch)")
        return pool

    def copy_to_host(self, dst: int, src: Any, nbytes: int) -> None:
        """Synchronous device-to-host copy on the accelerator's copy stream (not a tenant's)."""
        if not getattr(self.tls, "bound", False):
            self.bind_thread()
        with self._copy_lock:
            self.check(_dtoh_async(dst, src, nbytes, self._copy_stream)[0], "cuMemcpyDtoHAsync")
            self.check(_stream_sync(self._copy_stream)[0], "cuStreamSynchronize")

    def close(self) -> None:
        with self._lock:
            ids = list(self._tenants)
        for tenant_id in ids:
            self.close_tenant(tenant_id)
        failed: list[tuple[Any, str]] = []

        def release() -> None:
            if not self.poison_reason:
                for ptr, _ in [*self._pinned, *self._regions]:
                    (err,) = cu.cuMemFreeHost(ptr)
                    if err:
                        failed.append((err, "cuMemFreeHost"))
                if self._scratch_pool is not None:
                    (err,) = cu.cuStreamSynchronize(self._copy_stream)
                    if err:
                        failed.append((err, "cuStreamSynchronize"))
                    (err,) = cu.cuMemPoolDestroy(self._scratch_pool)
                    if err:
                        failed.append((err, "cuMemPoolDestroy (snapshot scratch)"))
                for stream in (self._probe_stream, self._copy_stream):
                    (err,) = cu.cuStreamDestroy(stream)
                    if err:
                        failed.append((err, "cuStreamDestroy"))
            self._pinned.clear()
            self._regions.clear()
            (err,) = cu.cuDevicePrimaryCtxRelease(self._dev)
            if err:
                failed.append((err, "cuDevicePrimaryCtxRelease"))

        self._owner.call(release)
        self._owner.stop()
        if failed:
            self.fail(*failed[0])
