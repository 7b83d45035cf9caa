"""Guest ABI v1: the names, signatures and codes a TensorWasm guest module is written against.

Owns the constants only (docs/guest-abi.md is the prose); the host side lives in hostcalls.py.
Pure: must not import wasmtime, the accelerator or anything with I/O.
"""

from __future__ import annotations

from typing import Final, Literal

ABI_VERSION: Final = 1
HOST_MODULE: Final = "tensorwasm"

MEMORY_EXPORT: Final = "memory"
ALLOC_EXPORT: Final = "tw_alloc"  # (len: i32) -> ptr: i32; 0 = out of memory
INIT_EXPORT: Final = "tw_init"  # optional, () -> i32; runs once per pool, < 0 = failure
RESERVED_PREFIX: Final = "tw_"  # exports with this prefix are never callable functions
GLOBAL_EXPORT_PREFIX: Final = "__tw_global_"  # the engine exports hidden mutable globals under it

# A callable function is (ptr: i32, len: i32) -> i64, returning (out_ptr << 32) | out_len.
# FAILED (all ones) means "the guest gave up": the caller sees the last host error, if any.
FAILED: Final = 0xFFFF_FFFF_FFFF_FFFF

ValType = Literal["i32", "i64", "f32", "f64"]

# name -> (params, results) of every host import under module "tensorwasm".
HOST_FUNCTIONS: Final[dict[str, tuple[tuple[ValType, ...], tuple[ValType, ...]]]] = {
    "log": (("i32", "i32", "i32"), ()),  # (level, ptr, len)
    "last_error": (("i32", "i32"), ("i32",)),  # (ptr, cap) -> full message length
    "gpu_alloc": (("i64",), ("i64",)),  # (nbytes) -> handle > 0 | error code
    "gpu_free": (("i64",), ("i32",)),  # (handle) -> 0 | error code
    "gpu_write": (("i64", "i64", "i32", "i32"), ("i32",)),  # (handle, offset, src_ptr, len)
    "gpu_read": (("i64", "i64", "i32", "i32"), ("i32",)),  # (handle, offset, dst_ptr, len)
    # (name_ptr, name_len, dims_ptr -> 6 x u32 grid xyz + block xyz, args_ptr, nargs, shared_mem_bytes)
    "gpu_launch": (("i32", "i32", "i32", "i32", "i32", "i32"), ("i32",)),
    "gpu_sync": ((), ("i32",)),
    # Optional (issue 14): (ptr, len) -> 0 | error code; hands a chunk of output to a streaming caller.
    "stream_write": (("i32", "i32"), ("i32",)),
}

# Error codes returned by host calls (always negative; 0 or a handle means success).
OK: Final = 0
E_INVALID: Final = -1  # bad argument, out-of-bounds guest pointer, malformed launch
E_NOT_FOUND: Final = -2  # unknown handle or kernel
E_GPU_MEMORY: Final = -3  # the tenant's GPU memory cap would be passed
E_LAUNCH: Final = -4  # kernel launch rejected
E_ACCELERATOR: Final = -5  # the accelerator failed (poisoned context)
E_NO_DEVICE: Final = -6  # this tenant has no GPU access
E_INTERNAL: Final = -7
E_NO_STREAM: Final = -8  # stream_write outside a streaming run or async job: keep it for the return value
MAX_STREAM_CHUNK: Final = 1 << 20  # bytes in one stream_write

# Kernel argument records: 16 bytes each, little-endian {kind: u32, _pad: u32, value: 8 bytes}.
ARG_RECORD_BYTES: Final = 16
ARG_KINDS: Final[dict[int, str]] = {0: "buffer", 1: "i32", 2: "u32", 3: "i64", 4: "u64", 5: "f32", 6: "f64"}
MAX_KERNEL_ARGS: Final = 64
MAX_KERNEL_NAME: Final = 256
LOG_LEVELS: Final[dict[int, str]] = {0: "debug", 1: "info", 2: "warning", 3: "error"}
MAX_LOG_BYTES: Final = 1024
