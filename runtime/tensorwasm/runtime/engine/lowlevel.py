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
Each has a fallback on public ground, used when the private name is missing (`FALLBACKS` says which
ones this process runs on, and the shard logs them): the library file where wasmtime-py's package
puts it, the value and callback types declared here from wasmtime's C header, the store context
from the public `Store.ptr()` through `wasmtime_store_context`, an object's struct found by its type
rather than its attribute name, and trap and error messages read through the C API. The test proves
each fallback gives what the private path gives, so an upgrade that moves a name keeps running.

Those fallbacks still call libwasmtime directly. `PUBLIC` (PublicApi) is the same interface as
`PRIVATE` through wasmtime-py's public Python API alone, 4-11x slower per invoke
(bench_wasmtime_api); an Engine runs on one or the other (`select`: its `wasmtime_api=` argument,
else TENSORWASM_RUNTIME_WASMTIME_API, else PRIVATE, or PUBLIC when the library cannot be loaded).
tests/unit/test_runtime_wasmtime_public.py runs the whole invoke path on PUBLIC with every C
function declared here sabotaged and compares every answer with PRIVATE's.
Only engine/ imports this module; it must not import the accelerator.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from collections.abc import Callable
from ctypes import c_size_t, c_uint64, c_void_p
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import wasmtime
from wasmtime import Trap, WasmtimeError

ffi: Any
try:
    from wasmtime import _ffi as ffi
except ImportError:  # pragma: no cover - an upstream layout change: every use below falls back
    ffi = None

FALLBACKS: list[str] = []  # private names missing in this wasmtime-py: their fallback is in use


def _library_path() -> str:
    try:
        return str(ffi.dll._name)
    except AttributeError:
        FALLBACKS.append("wasmtime._ffi.dll._name")
        return str(public_library_path())


def public_library_path() -> Path:
    """libwasmtime where the wasmtime package installs it (wasmtime/<platform>-<arch>/)."""
    found = sorted(Path(wasmtime.__file__).parent.glob("*/*wasmtime.*"))
    libs = [p for p in found if p.suffix in (".so", ".dylib", ".dll")]
    if not libs:
        raise ImportError(f"no libwasmtime under {Path(wasmtime.__file__).parent}")
    return libs[0]


# Why the direct C path cannot be used in this process (None: it can). Then every Engine runs on
# PublicApi, wasmtime-py's public Python API alone.
PRIVATE_UNAVAILABLE: str | None = None
_lib: Any = None
_quick: Any = None
try:
    _LIB_PATH = _library_path()
    _lib = ctypes.CDLL(_LIB_PATH)  # releases the GIL: for calls that run guest code
    # Holds the GIL: for tiny accessors, so a hot-path call does not hand the GIL to another thread
    # (the epoch ticker, other invokes) and wait to get it back. Never for anything that runs wasm.
    _quick = ctypes.PyDLL(_LIB_PATH)
except (OSError, ImportError) as exc:  # pragma: no cover - an upstream layout change
    PRIVATE_UNAVAILABLE = f"libwasmtime could not be loaded: {exc}"


def _fn(name: str, restype: Any, *argtypes: Any, lib: Any = None) -> Any:
    lib = lib or _lib
    try:
        f = getattr(lib, name)
    except AttributeError as exc:  # pragma: no cover - no library, or a C API name gone upstream
        global PRIVATE_UNAVAILABLE
        PRIVATE_UNAVAILABLE = PRIVATE_UNAVAILABLE or f"libwasmtime has no {name}: {exc}"
        return _unavailable(name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


def _unavailable(name: str) -> Any:
    def call(*_args: Any) -> Any:
        raise RuntimeError(f"{name} is not available ({PRIVATE_UNAVAILABLE}); use the public wasmtime API")

    return call


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
# The epoch deadline callback (engine/deadlines.py), public C API: (store*, callback, data, finalizer).
store_epoch_deadline_callback = _fn(
    "wasmtime_store_epoch_deadline_callback", None, c_void_p, c_void_p, c_void_p, c_void_p, lib=_quick
)
error_new = _fn("wasmtime_error_new", c_void_p, ctypes.c_char_p, lib=_quick)  # (message) -> error*
# wasmtime_error_t *(*)(wasmtime_context_t *, void *data, uint64_t *delta, uint8_t *update_kind):
# NULL with *delta set continues that many ticks from now; an error stops the guest.
EpochDeadlineCallback = ctypes.CFUNCTYPE(c_size_t, c_void_p, c_void_p, c_void_p, c_void_p)
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


# --- value and callback types: wasmtime-py's declarations, else ours from wasmtime.h (v50) ---


class PublicValRaw(ctypes.Union):
    """wasmtime_val_raw_t: 16 bytes; the engine reads and writes only the numeric members."""

    _fields_ = [
        ("i32", ctypes.c_int32),
        ("i64", ctypes.c_int64),
        ("f32", ctypes.c_float),
        ("f64", ctypes.c_double),
        ("v128", ctypes.c_uint8 * 16),
        ("funcref", c_void_p),
    ]


class _PublicValUnion(ctypes.Union):
    _fields_ = [
        ("i32", ctypes.c_int32),
        ("i64", ctypes.c_int64),
        ("f32", ctypes.c_float),
        ("f64", ctypes.c_double),
        ("ref", ctypes.c_uint64 * 3),  # anyref/externref/exnref {u64, u32, u32, void*}: the largest
        ("v128", ctypes.c_uint8 * 16),
    ]


class PublicVal(ctypes.Structure):
    """wasmtime_val_t: {kind u8, union}."""

    _fields_ = [("kind", ctypes.c_uint8), ("of", _PublicValUnion)]


PublicHostCallback = ctypes.CFUNCTYPE(c_size_t, c_void_p, c_void_p, ctypes.POINTER(PublicValRaw), c_size_t)


def _ffi_type(name: str, fallback: Any) -> Any:
    found = getattr(ffi, name, None)
    if found is None:
        FALLBACKS.append(f"wasmtime._ffi.{name}")
        return fallback
    return found


ValRaw = _ffi_type("wasmtime_val_raw_t", PublicValRaw)  # 16-byte union
Val = _ffi_type("wasmtime_val_t", PublicVal)  # {kind u8, union}
HostCallback = _ffi_type("wasmtime_func_unchecked_callback_t", PublicHostCallback)


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
    from_ptr = getattr(Trap, "_from_ptr", None)
    if from_ptr is None or ffi is None:
        return public_take_trap(trap_addr)
    trap = from_ptr(ctypes.cast(trap_addr, ctypes.POINTER(ffi.wasm_trap_t)))
    code = trap.trap_code
    return trap.message, (code.value if code is not None else None)


def take_error(error_addr: int) -> str:
    """Message of a wasmtime_error_t returned by a call; frees it."""
    from_ptr = getattr(WasmtimeError, "_from_ptr", None)
    if from_ptr is None or ffi is None:
        return public_take_error(error_addr)
    return str(from_ptr(ctypes.cast(error_addr, ctypes.POINTER(ffi.wasmtime_error_t))))


class _ByteVec(ctypes.Structure):
    _fields_ = [("size", c_size_t), ("data", c_void_p)]


_trap_message = _fn("wasm_trap_message", None, c_void_p, ctypes.POINTER(_ByteVec))
_trap_code = _fn("wasmtime_trap_code", ctypes.c_bool, c_void_p, ctypes.POINTER(ctypes.c_uint8))
_trap_delete = _fn("wasm_trap_delete", None, c_void_p)
_error_message = _fn("wasmtime_error_message", None, c_void_p, ctypes.POINTER(_ByteVec))
_error_delete = _fn("wasmtime_error_delete", None, c_void_p)
_byte_vec_delete = _fn("wasm_byte_vec_delete", None, ctypes.POINTER(_ByteVec))
_store_context = _fn("wasmtime_store_context", c_void_p, c_void_p, lib=_quick)


def _take_message(getter: Any, addr: int) -> str:
    vec = _ByteVec()
    getter(addr, ctypes.byref(vec))
    try:
        raw = ctypes.string_at(vec.data, vec.size) if vec.size else b""
    finally:
        _byte_vec_delete(ctypes.byref(vec))
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def public_take_trap(trap_addr: int) -> tuple[str, int | None]:
    """take_trap through the C API alone (wasm_trap_message, wasmtime_trap_code)."""
    try:
        message = _take_message(_trap_message, trap_addr)
        code = ctypes.c_uint8()
        has_code = bool(_trap_code(trap_addr, ctypes.byref(code)))
    finally:
        _trap_delete(trap_addr)
    return message, (int(code.value) if has_code else None)


def public_take_error(error_addr: int) -> str:
    """take_error through the C API alone (wasmtime_error_message)."""
    try:
        return _take_message(_error_message, error_addr)
    finally:
        _error_delete(error_addr)


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
    context = getattr(store, "_context", None)
    if context is None:
        return public_store_context(store)
    return pointer_value(context())


def public_store_context(store: Any) -> int:
    """store_context from the public `Store.ptr()` through the C API's wasmtime_store_context."""
    context = _store_context(pointer_value(store.ptr()))
    if not context:
        raise ValueError("wasmtime_store_context returned null")
    return int(context)


def _struct_address(obj: Any, attr: str, struct: str) -> int:
    found = getattr(obj, attr, None)
    if found is None:
        return public_struct_address(obj, struct)
    return ctypes.addressof(found)


def public_struct_address(obj: Any, struct: str) -> int:
    """Address of the ctypes struct named `struct` (wasmtime_func, ...) that `obj` holds, found by
    its type, whatever the attribute is called."""
    values = [getattr(obj, n, None) for n in getattr(obj, "__slots__", ())] + list(
        getattr(obj, "__dict__", {}).values()
    )
    for value in values:
        if isinstance(value, ctypes.Structure) and type(value).__name__ in (struct, f"{struct}_t"):
            return ctypes.addressof(value)
    raise RuntimeError(
        f"no {struct} struct on {type(obj).__name__}: wasmtime-py changed, port engine/lowlevel.py"
    )


def func_address(func: Any) -> int:
    return _struct_address(func, "_func", "wasmtime_func")


def memory_address(memory: Any) -> int:
    return _struct_address(memory, "_memory", "wasmtime_memory")


def global_address(global_: Any) -> int:
    return _struct_address(global_, "_global", "wasmtime_global")


def table_address(table: Any) -> int:
    return _struct_address(table, "_table", "wasmtime_table")


# --- the two API layers an Engine can run on: the direct C path above, or wasmtime-py's public API ---

# (env, caller, args_and_results*, nargs_and_results) -> trap*: the host-call shape both layers take.
HostCall = Callable[[int, Any, int, int], int]
_RAW_CALLBACK = ctypes.CFUNCTYPE(c_size_t, c_void_p, c_void_p, c_void_p, c_size_t)
_KEEP_ALIVE: list[Any] = []  # ctypes callbacks must outlive every linker that references them


def _private_define_host_func(linker: Any, module: str, name: str, ty: Any, call: HostCall) -> None:
    cb = _RAW_CALLBACK(call)
    _KEEP_ALIVE.extend((cb, ty))
    mod, fname = module.encode(), name.encode()
    err = linker_define_func_unchecked(
        pointer_value(linker.ptr()), mod, len(mod), fname, len(fname), pointer_value(ty.ptr()),
        ctypes.cast(cb, c_void_p).value, None, None,
    )  # fmt: skip
    if err:
        raise RuntimeError(f"could not define host function {name}: {take_error(err)}")


def _private_ticker(engine: Any) -> tuple[int, Callable[[int], None]]:
    return pointer_value(engine.ptr()), increment_epoch


PRIVATE = SimpleNamespace(
    name="private",
    ValRaw=ValRaw,
    Val=Val,
    store_context=store_context,
    func_address=func_address,
    memory_address=memory_address,
    global_address=global_address,
    table_address=table_address,
    memory_data=memory_data,
    memory_data_size=memory_data_size,
    table_size=table_size,
    memory_grow=memory_grow,
    global_get=global_get,
    global_set=global_set,
    set_epoch_deadline=set_epoch_deadline,
    func_call_unchecked=func_call_unchecked,
    take_trap=take_trap,
    take_error=take_error,
    trap_new=trap_new,
    caller_context=caller_context,
    define_host_func=_private_define_host_func,
    ticker=_private_ticker,
)

_KINDS = {"i32": 0, "i64": 1, "f32": 2, "f64": 3}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}


class PublicApi:
    """The same calls as PRIVATE through wasmtime-py's public Python API only: `Func.__call__`,
    `Memory.data_ptr/data_len/grow`, `Global.value/set_value`, `Table.size`, `Store.set_epoch_deadline`,
    `Engine.increment_epoch`, `Linker.define_func` with `access_caller`, `Trap.message/trap_code`.

    The slow path (each call re-reads the function type and boxes every value, see
    docs/performance.md) that keeps a shard running when an upgrade of wasmtime-py breaks the private
    layer, and the proof that the engine's logic does not depend on it. The engine's integer
    "addresses" are handles here: `id()` of the wasmtime-py object, held weakly (the instance keeps
    the objects alive). The args/results slots and wasmtime_val_t buffers are our own ctypes
    declarations (PublicValRaw, PublicVal), read and written in Python.

    Limit: wasmtime-py keeps a host function's exception in one module global until the call that
    trapped re-raises it; a host call that stops its guest (host-call budget, a stopped stream) on one
    thread while another thread's guest traps can swap their trap messages. The faults themselves
    stay right (they are kept on each instance's GuestContext); only the trap text can be another's.
    """

    name = "public"
    ValRaw = PublicValRaw
    Val = PublicVal

    def __init__(self) -> None:
        self._objects: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._pending: dict[int, Any] = {}  # trap and error handles not yet taken
        self._sigs: weakref.WeakKeyDictionary[Any, tuple[tuple[str, ...], tuple[str, ...]]] = (
            weakref.WeakKeyDictionary()
        )  # a Func's param and result kinds, gone with the Func
        self._local = threading.local()  # the store context and Caller of this thread's host call

    def _register(self, obj: Any) -> int:
        self._objects[id(obj)] = obj
        return id(obj)

    def _hold(self, obj: Any) -> int:
        self._pending[id(obj)] = obj
        return id(obj)

    def _store(self, ctx: int) -> Any:
        # Inside a host call the Caller is the store's view wasmtime-py wants; else the Store.
        caller = getattr(self._local, "caller", None)
        if caller is not None and getattr(self._local, "ctx", None) == ctx:
            return caller
        return self._objects[ctx]

    store_context = _register
    func_address = _register
    memory_address = _register
    global_address = _register
    table_address = _register

    def memory_data(self, ctx: int, mem: int) -> int:
        return pointer_value(self._objects[mem].data_ptr(self._store(ctx)))

    def memory_data_size(self, ctx: int, mem: int) -> int:
        return int(self._objects[mem].data_len(self._store(ctx)))

    def table_size(self, ctx: int, table: int) -> int:
        return int(self._objects[table].size(self._store(ctx)))

    def memory_grow(self, ctx: int, mem: int, delta: int, prev_addr: int) -> int:
        try:
            prev = self._objects[mem].grow(self._store(ctx), delta)
        except WasmtimeError as exc:
            return self._hold(exc)
        c_uint64.from_address(prev_addr).value = prev
        return 0

    def global_get(self, ctx: int, glob: int, val_addr: int) -> None:
        g, store = self._objects[glob], self._store(ctx)
        kind = str(g.type(store).content)
        val = PublicVal.from_address(val_addr)
        val.kind = _KINDS[kind]
        setattr(val.of, kind, g.value(store))

    def global_set(self, ctx: int, glob: int, val_addr: int) -> int:
        val = PublicVal.from_address(val_addr)
        try:
            self._objects[glob].set_value(self._store(ctx), getattr(val.of, _KIND_NAMES[val.kind]))
        except WasmtimeError as exc:
            return self._hold(exc)
        return 0

    def set_epoch_deadline(self, ctx: int, ticks: int) -> None:
        self._objects[ctx].set_epoch_deadline(ticks)

    def _signature(self, func: Any, store: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        found = self._sigs.get(func)
        if found is None:
            ty = func.type(store)
            found = self._sigs[func] = (tuple(map(str, ty.params)), tuple(map(str, ty.results)))
        return found

    def func_call_unchecked(self, ctx: int, func: int, slots: int, nslots: int, trap_addr: int) -> int:
        store, f = self._objects[ctx], self._objects[func]
        params, results = self._signature(f, store)
        raw = (PublicValRaw * max(nslots, 1)).from_address(slots)
        args = [getattr(raw[i], kind) for i, kind in enumerate(params)]
        local = self._local
        outer = getattr(local, "ctx", None), getattr(local, "caller", None)
        local.ctx, local.caller = ctx, None
        try:
            out = f(store, *args)
        except Trap as trap:
            c_void_p.from_address(trap_addr).value = self._hold(trap)
            return 0
        except WasmtimeError as exc:
            return self._hold(exc)
        finally:
            local.ctx, local.caller = outer
        if results:
            setattr(raw[0], results[0], out)
        return 0

    def take_trap(self, handle: int) -> tuple[str, int | None]:
        trap = self._pending.pop(handle)
        code = trap.trap_code
        return trap.message, (code.value if code is not None else None)

    def take_error(self, handle: int) -> str:
        return str(self._pending.pop(handle))

    def trap_new(self, message: bytes, length: int) -> int:
        return self._hold(Trap(message[:length].decode("utf-8", "replace")))

    def caller_context(self, _caller: Any) -> int | None:
        return getattr(self._local, "ctx", None)

    def define_host_func(self, linker: Any, module: str, name: str, ty: Any, call: HostCall) -> None:
        params, results = tuple(map(str, ty.params)), tuple(map(str, ty.results))
        nslots = max(len(params), len(results))
        local = self._local

        def host(caller: Any, *args: Any) -> Any:
            raw = (PublicValRaw * max(nslots, 1))()
            for i, (kind, value) in enumerate(zip(params, args, strict=True)):
                setattr(raw[i], kind, value)
            outer = getattr(local, "caller", None)
            local.caller = caller
            try:
                trap = call(0, caller, ctypes.addressof(raw), nslots)
            finally:
                local.caller = outer
            if trap:
                raise self._pending.pop(trap)
            return getattr(raw[0], results[0]) if results else None

        linker.define_func(module, name, ty, host, access_caller=True)

    def ticker(self, engine: Any) -> tuple[int, Callable[[int], None]]:
        return 0, lambda _ptr: engine.increment_epoch()


PUBLIC = PublicApi()
API_ENV = "TENSORWASM_RUNTIME_WASMTIME_API"


def select(api: str | None = None) -> Any:
    """The layer an Engine runs on: `api`, else $TENSORWASM_RUNTIME_WASMTIME_API, else private
    (public when the private layer cannot load). Raises ValueError for anything else."""
    choice = api or os.environ.get(API_ENV, "") or ("public" if PRIVATE_UNAVAILABLE else "private")
    if choice not in ("private", "public"):
        raise ValueError(f"wasmtime API layer must be 'private' or 'public', got {choice!r} ({API_ENV})")
    if choice == "private" and PRIVATE_UNAVAILABLE:
        raise ValueError(f"the private wasmtime layer is unavailable: {PRIVATE_UNAVAILABLE}; use 'public'")
    return PRIVATE if choice == "private" else PUBLIC
