"""Direct ctypes entry points into libwasmtime for the hot path (pinned to wasmtime-py 50).

Why: wasmtime-py's `Func.__call__` re-reads the function type over FFI and boxes every value
(20-50 us a call). We load the same shared library a second time (same handle, separate ctypes
function objects, so wasmtime-py's own argtypes stay untouched) and declare the few C functions we
need with plain `c_void_p`/integer signatures. Calls through `CDLL` release the GIL, which lets
the epoch ticker run while guest code spins.

This is the ONLY module that touches wasmtime-py's private API (`wasmtime._ffi`, the `_func`,
`_memory`, `_global`, `_table` structs, `Store._context()`, `Trap._from_ptr`,
`WasmtimeError._from_ptr`); `PRIVATE_NAMES` lists them and
tests/unit/test_runtime_wasmtime_private.py fails, naming the one that moved, on an upstream change.
Only engine/ imports this module; it must not import the accelerator.
"""

from __future__ import annotations

import ctypes
from ctypes import c_size_t, c_uint64, c_void_p
from typing import Any

from wasmtime import Trap, WasmtimeError
from wasmtime import _ffi as ffi

_lib = ctypes.CDLL(ffi.dll._name)  # releases the GIL: for calls that run guest code
# Holds the GIL: for tiny accessors, so a hot-path call does not hand the GIL to another thread
# (the epoch ticker, other invokes) and wait to get it back. Never for anything that runs wasm.
_quick = ctypes.PyDLL(ffi.dll._name)


def _fn(name: str, restype: Any, *argtypes: Any, lib: Any = _lib) -> Any:
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


# (context, func*, args_and_results*, len, trap**) -> error*
func_call_unchecked = _fn(
    "wasmtime_func_call_unchecked", c_void_p, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p
)
set_epoch_deadline = _fn("wasmtime_context_set_epoch_deadline", None, c_void_p, c_uint64, lib=_quick)
increment_epoch = _fn("wasmtime_engine_increment_epoch", None, c_void_p, lib=_quick)
memory_data = _fn("wasmtime_memory_data", c_void_p, c_void_p, c_void_p, lib=_quick)
memory_data_size = _fn("wasmtime_memory_data_size", c_size_t, c_void_p, c_void_p, lib=_quick)
table_size = _fn("wasmtime_table_size", c_uint64, c_void_p, c_void_p, lib=_quick)
# (context, memory*, delta pages, prev_size*) -> error*
memory_grow = _fn("wasmtime_memory_grow", c_void_p, c_void_p, c_void_p, c_uint64, c_void_p)
global_get = _fn("wasmtime_global_get", None, c_void_p, c_void_p, c_void_p, lib=_quick)
global_set = _fn("wasmtime_global_set", c_void_p, c_void_p, c_void_p, c_void_p, lib=_quick)
caller_context = _fn("wasmtime_caller_context", c_void_p, c_void_p, lib=_quick)
linker_define_func_unchecked = _fn(
    "wasmtime_linker_define_func_unchecked",
    c_void_p,
    c_void_p,
    ctypes.c_char_p,
    c_size_t,
    ctypes.c_char_p,
    c_size_t,
    c_void_p,
    c_void_p,
    c_void_p,
    c_void_p,
)
trap_new = _fn("wasmtime_trap_new", c_void_p, ctypes.c_char_p, c_size_t)
# libc memmove without releasing the GIL, for copies small enough that a GIL hand-off costs more.
memmove_quick = ctypes.PYFUNCTYPE(c_void_p, c_void_p, c_void_p, c_size_t)(
    int(ctypes.cast(ctypes.memmove, c_void_p).value or 0)
)
QUICK_COPY_BYTES = 256 << 10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [c_void_p, c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
MADV_DONTNEED = 4


def discard_pages(addr: int, nbytes: int) -> bool:
    """madvise(DONTNEED): private pages go back to what the mapping started with. True on success."""
    return int(_libc.madvise(addr, nbytes, MADV_DONTNEED)) == 0


ValRaw = ffi.wasmtime_val_raw_t  # 16-byte union
Val = ffi.wasmtime_val_t  # {kind u8, union}
HostCallback = ffi.wasmtime_func_unchecked_callback_t


def address(obj: Any) -> int:
    """Address of a ctypes structure (wasmtime_func_t, wasmtime_memory_t, ...)."""
    return ctypes.addressof(obj)


def pointer_value(ptr: Any) -> int:
    """Integer value of a ctypes pointer (a store context)."""
    value = ctypes.cast(ptr, c_void_p).value
    if not value:
        raise ValueError("null pointer")
    return int(value)


def take_trap(trap_addr: int) -> tuple[str, int | None]:
    """Message and trap code of a trap returned by a call; frees it."""
    trap = Trap._from_ptr(ctypes.cast(trap_addr, ctypes.POINTER(ffi.wasm_trap_t)))
    code = trap.trap_code
    return trap.message, (code.value if code is not None else None)


def take_error(error_addr: int) -> str:
    """Message of a wasmtime_error_t returned by a call; frees it."""
    err = WasmtimeError._from_ptr(ctypes.cast(error_addr, ctypes.POINTER(ffi.wasmtime_error_t)))
    return str(err)


# --- the private attributes of wasmtime-py objects this module reads (see PRIVATE_NAMES) ---

PRIVATE_NAMES = (
    "wasmtime._ffi.dll._name",
    "wasmtime._ffi.wasmtime_val_raw_t",
    "wasmtime._ffi.wasmtime_val_t",
    "wasmtime._ffi.wasmtime_func_unchecked_callback_t",
    "Store._context()",
    "Func._func",
    "Memory._memory",
    "Global._global",
    "Table._table",
    "Trap._from_ptr",
    "WasmtimeError._from_ptr",
)


def store_context(store: Any) -> int:
    """Address of a Store's wasmtime_context_t."""
    return pointer_value(store._context())


def func_address(func: Any) -> int:
    return ctypes.addressof(func._func)


def memory_address(memory: Any) -> int:
    return ctypes.addressof(memory._memory)


def global_address(global_: Any) -> int:
    return ctypes.addressof(global_._global)


def table_address(table: Any) -> int:
    return ctypes.addressof(table._table)
