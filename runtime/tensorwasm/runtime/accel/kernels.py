"""The built-in kernel library: one CUDA C source (compiled by NVRTC) and a numpy twin per kernel.

Owns kernel names, their parameter lists, the bytes each buffer argument must hold (checked before a
launch, so a guest's wrong `n` is refused instead of poisoning the shared context), the CUDA C source
and the numpy twins the CPU backend runs. Every CUDA kernel walks a grid-stride loop over a linear
thread id spanning all three grid/block dimensions, so any valid launch shape computes each element
exactly once and the result does not depend on grid/block (the numpy twins ignore them).
Must not import cuda or wasmtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tensorwasm.runtime.tenancy import deadline

F32 = 4

# Parameter classes: "ptr" takes a buffer handle (built-ins take no raw addresses); the rest are scalars.
ParamClass = str  # "ptr" | "b64" | "b32" | "u32" | "i32" | "u64" | "i64" | "f32" | "f64"

Extents = Callable[[Sequence[int | float]], Sequence[tuple[int, int]]]
NumpyTwin = Callable[[Sequence["npt.NDArray[np.uint8] | int | float"]], None]


@dataclass(frozen=True)
class KernelSignature:
    """What a launch must pass: one parameter class per argument, and how big each buffer must be."""

    name: str
    params: tuple[ParamClass, ...]
    # (argument index, bytes the buffer there must hold) computed from the scalar arguments; None = unknown
    extents: Extents | None = None


def _vec(values: Sequence[int | float], *ptrs: int, n_index: int) -> list[tuple[int, int]]:
    n = int(values[n_index])
    return [(i, n * F32) for i in ptrs]


BUILTIN_SIGNATURES: dict[str, KernelSignature] = {
    "vector_add": KernelSignature(
        "vector_add", ("ptr", "ptr", "ptr", "u32"), lambda v: _vec(v, 0, 1, 2, n_index=3)
    ),
    "saxpy": KernelSignature("saxpy", ("f32", "ptr", "ptr", "u32"), lambda v: _vec(v, 1, 2, n_index=3)),
    "matmul": KernelSignature(
        "matmul",
        ("ptr", "ptr", "ptr", "u32", "u32", "u32"),
        lambda v: [
            (0, int(v[3]) * int(v[5]) * F32),
            (1, int(v[5]) * int(v[4]) * F32),
            (2, int(v[3]) * int(v[4]) * F32),
        ],
    ),
    "reduce_sum": KernelSignature(
        "reduce_sum", ("ptr", "ptr", "u32"), lambda v: [(0, int(v[2]) * F32), (1, F32)]
    ),
}

CUDA_SOURCE = r"""
// TensorWasm built-in kernels. float32, row-major. Grid-stride over a linear id spanning all dims.
__device__ __forceinline__ unsigned long long tw_tid() {
    unsigned long long block = ((unsigned long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x
                               + blockIdx.x;
    unsigned long long per_block = (unsigned long long)blockDim.x * blockDim.y * blockDim.z;
    unsigned long long local = ((unsigned long long)threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x
                               + threadIdx.x;
    return block * per_block + local;
}
__device__ __forceinline__ unsigned long long tw_nthreads() {
    return (unsigned long long)gridDim.x * gridDim.y * gridDim.z
           * blockDim.x * blockDim.y * blockDim.z;
}

extern "C" __global__ void vector_add(const float* a, const float* b, float* out, unsigned int n) {
    for (unsigned long long i = tw_tid(); i < n; i += tw_nthreads()) out[i] = a[i] + b[i];
}

extern "C" __global__ void saxpy(float alpha, const float* x, float* y, unsigned int n) {
    for (unsigned long long i = tw_tid(); i < n; i += tw_nthreads()) y[i] = alpha * x[i] + y[i];
}

extern "C" __global__ void matmul(const float* a, const float* b, float* c,
                                  unsigned int m, unsigned int n, unsigned int k) {
    unsigned long long total = (unsigned long long)m * n;
    for (unsigned long long idx = tw_tid(); idx < total; idx += tw_nthreads()) {
        unsigned long long row = idx / n, col = idx % n;
        float acc = 0.0f;
        for (unsigned int p = 0; p < k; ++p) acc += a[row * k + p] * b[(unsigned long long)p * n + col];
        c[idx] = acc;
    }
}

// Internal, never a tenant's (not in BUILTIN_SIGNATURES): out[c] += the word sum (accel/checksum.py) of
// chunk c = buf[c * chunk : min((c + 1) * chunk, n)], chunk a multiple of 8; blockIdx.y is the chunk,
// blockDim.x a multiple of 32. Sums wrap modulo 2^64, so atomics in any order give the same result.
extern "C" __global__ void tw_chunk_word_sums(const unsigned char* buf, unsigned long long n,
                                              unsigned long long chunk, unsigned long long* out) {
    const unsigned long long* w = (const unsigned long long*)buf;
    unsigned long long words = n >> 3, c = blockIdx.y, first = c * (chunk >> 3);
    unsigned long long last = min(first + (chunk >> 3), words), s = 0;
    for (unsigned long long i = first + (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < last;
         i += (unsigned long long)gridDim.x * blockDim.x) s += w[i];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if ((threadIdx.x & 31u) == 0u && s) atomicAdd(out + c, s);
    if (c == gridDim.y - 1 && blockIdx.x == 0 && threadIdx.x == 0 && (n & 7ull)) {
        unsigned long long tail = 0;
        for (unsigned long long b = words << 3; b < n; ++b)
            tail |= (unsigned long long)buf[b] << (8 * (b & 7ull));
        atomicAdd(out + c, tail);
    }
}

// Adds sum(x[0:n]) to out[0] (the caller zeroes out[0] for a plain sum).
extern "C" __global__ void reduce_sum(const float* x, float* out, unsigned int n) {
    float s = 0.0f;
    for (unsigned long long i = tw_tid(); i < n; i += tw_nthreads()) s += x[i];
    unsigned int per_block = blockDim.x * blockDim.y * blockDim.z;
    if ((per_block & 31u) == 0u) {   // whole warps only: the shuffle needs every lane present
        for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
        unsigned int lane = ((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x) & 31u;
        if (lane == 0u) atomicAdd(out, s);
    } else if (s != 0.0f) {
        atomicAdd(out, s);
    }
}
"""


def _f32(buf: npt.NDArray[np.uint8] | int | float, count: int) -> npt.NDArray[np.float32]:
    assert isinstance(buf, np.ndarray)
    return buf[: count * F32].view(np.float32)


# The numpy twins work in steps of about this many multiply-adds and call the invoke's deadline
# check between steps (tenancy.deadline): a CPU kernel stops within one step of its deadline.
STEP_OPS = 1 << 22


def _steps(n: int, per_item: int) -> range:
    """Start indices of the steps over `n` items costing `per_item` operations each."""
    return range(0, n, max(1, STEP_OPS // max(1, per_item)))


def _vector_add(args: Sequence[npt.NDArray[np.uint8] | int | float]) -> None:
    n = int(args[3])
    a, b, out = _f32(args[0], n), _f32(args[1], n), _f32(args[2], n)
    step = STEP_OPS
    for i in _steps(n, 1):
        deadline.check()
        np.add(a[i : i + step], b[i : i + step], out=out[i : i + step])


def _saxpy(args: Sequence[npt.NDArray[np.uint8] | int | float]) -> None:
    n = int(args[3])
    alpha, x, y = np.float32(args[0]), _f32(args[1], n), _f32(args[2], n)
    step = STEP_OPS
    for i in _steps(n, 1):
        deadline.check()
        y[i : i + step] = alpha * x[i : i + step] + y[i : i + step]


def _matmul(args: Sequence[npt.NDArray[np.uint8] | int | float]) -> None:
    m, n, k = int(args[3]), int(args[4]), int(args[5])
    a = _f32(args[0], m * k).reshape(m, k)
    b = _f32(args[1], k * n).reshape(k, n)
    c = _f32(args[2], m * n).reshape(m, n)
    rows = max(1, STEP_OPS // max(1, n * k))
    for r in _steps(m, n * k):
        deadline.check()
        c[r : r + rows] = a[r : r + rows] @ b


def _reduce_sum(args: Sequence[npt.NDArray[np.uint8] | int | float]) -> None:
    n = int(args[2])
    out = _f32(args[1], 1)
    x = _f32(args[0], n)
    total = np.float32(0)
    for i in _steps(n, 1):
        deadline.check()
        total += x[i : i + STEP_OPS].sum(dtype=np.float32)
    out[0] += total


NUMPY_TWINS: dict[str, NumpyTwin] = {
    "vector_add": _vector_add,
    "saxpy": _saxpy,
    "matmul": _matmul,
    "reduce_sum": _reduce_sum,
}
