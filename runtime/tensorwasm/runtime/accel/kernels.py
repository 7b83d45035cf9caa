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


def _vector_add(args: Sequence[npt.NDArray[np.uint8] | int | float]) -> None:
    n = int(args[3])
    np.add(_f32(args[0], n), _f32(args[1], n), out=_f32(args[2], n))


def _saxpy(args: Sequence[npt.NDArray[np.uint8] | int | float]) -> None:
    n = int(args[3])
    y = _f32(args[2], n)
    y[:] = np.float32(args[0]) * _f32(args[1], n) + y


def _matmul(args: Sequence[npt.NDArray[np.uint8] | int | float]) -> None:
    m, n, k = int(args[3]), int(args[4]), int(args[5])
    a = _f32(args[0], m * k).reshape(m, k)
    b = _f32(args[1], k * n).reshape(k, n)
    _f32(args[2], m * n).reshape(m, n)[:] = a @ b


def _reduce_sum(args: Sequence[npt.NDArray[np.uint8] | int | float]) -> None:
    n = int(args[2])
    out = _f32(args[1], 1)
    out[0] += _f32(args[0], n).sum(dtype=np.float32)


NUMPY_TWINS: dict[str, NumpyTwin] = {
    "vector_add": _vector_add,
    "saxpy": _saxpy,
    "matmul": _matmul,
    "reduce_sum": _reduce_sum,
}
