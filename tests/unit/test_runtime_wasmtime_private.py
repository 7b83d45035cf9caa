"""wasmtime-py private API the engine relies on (only engine/lowlevel.py touches it).

Fails loudly, naming the attribute, when an upgrade of wasmtime-py moves one of them: pin the
version (pyproject says `wasmtime>=50,<51`) or port lowlevel.py before anything else breaks.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import wasmtime
from wasmtime import _ffi as ffi

from tensorwasm.runtime.engine import Engine, lowlevel
from tests.unit.engine_helpers import inline, one_of_each_export


def test_every_private_name_is_listed_once() -> None:
    assert len(set(lowlevel.PRIVATE_NAMES)) == len(lowlevel.PRIVATE_NAMES) == 11


@pytest.mark.parametrize(
    "name", ["wasmtime_val_raw_t", "wasmtime_val_t", "wasmtime_func_unchecked_callback_t", "dll"]
)
def test_ffi_exposes(name: str) -> None:
    assert hasattr(ffi, name), f"wasmtime._ffi.{name} is gone: port engine/lowlevel.py"
    if name == "dll":
        assert isinstance(ffi.dll._name, str), "wasmtime._ffi.dll._name changed: port engine/lowlevel.py"


def test_object_structs_and_context_are_where_lowlevel_reads_them(engine: Engine) -> None:
    eng = engine
    module = inline(
        eng,
        '(global (export "g") (mut i32) (i32.const 7)) (table (export "t") 3 funcref)'
        '(func (export "f") (param i32 i32) (result i64) (i64.const 0))',
    )
    store = wasmtime.Store(eng.wasmtime_engine)
    inst = module.pre.instantiate(store)
    ex = inst.exports(store)
    ctx = lowlevel.store_context(store)
    assert ctx == ctypes.cast(store._context(), ctypes.c_void_p).value
    for what, obj, attr in (
        ("Func._func", ex["f"], "_func"),
        ("Memory._memory", ex["memory"], "_memory"),
        ("Global._global", ex["g"], "_global"),
        ("Table._table", ex["t"], "_table"),
    ):
        assert hasattr(obj, attr), f"wasmtime {what} is gone: port engine/lowlevel.py"
    # The structs are the ones the C API takes: read through them and compare with the public API.
    assert lowlevel.memory_data_size(ctx, lowlevel.memory_address(ex["memory"])) == ex["memory"].data_len(
        store
    )
    assert lowlevel.table_size(ctx, lowlevel.table_address(ex["t"])) == ex["t"].size(store) == 3
    raw = lowlevel.Val()
    lowlevel.global_get(ctx, lowlevel.global_address(ex["g"]), ctypes.addressof(raw))
    assert raw.of.i32 == ex["g"].value(store) == 7
    assert lowlevel.func_address(ex["f"]) > 0


def test_trap_and_error_constructors_from_pointers_exist() -> None:
    for cls in (wasmtime.Trap, wasmtime.WasmtimeError):
        assert callable(getattr(cls, "_from_ptr", None)), f"{cls.__name__}._from_ptr is gone"
    msg = b"probe"
    message, code = lowlevel.take_trap(int(lowlevel.trap_new(msg, len(msg))))
    assert "probe" in message and code is None


# --- the public-ground fallbacks (used when a private name above is gone) give the same answers ---


def test_no_fallback_is_in_use() -> None:
    # Loud on an upstream change: the engine still runs (on its fallbacks), but port lowlevel.py.
    assert lowlevel.FALLBACKS == [], f"wasmtime-py moved {lowlevel.FALLBACKS}: running on the fallbacks"


def test_the_fallback_library_path_is_the_loaded_library() -> None:
    assert lowlevel.public_library_path().resolve() == Path(ffi.dll._name).resolve()


def test_the_fallback_value_types_have_the_c_layout() -> None:
    assert ctypes.sizeof(lowlevel.PublicValRaw) == ctypes.sizeof(ffi.wasmtime_val_raw_t) == 16
    assert ctypes.sizeof(lowlevel.PublicVal) == ctypes.sizeof(ffi.wasmtime_val_t)
    assert lowlevel.PublicVal.of.offset == ffi.wasmtime_val_t.of.offset
    for name in ("i32", "i64", "f32", "f64"):
        assert (
            getattr(lowlevel.PublicValRaw, name).offset == getattr(ffi.wasmtime_val_raw_t, name).offset == 0
        )


def test_the_fallback_accessors_find_what_the_private_ones_find(engine: Engine) -> None:
    store, ex = one_of_each_export(engine)
    assert lowlevel.public_store_context(store) == lowlevel.store_context(store)
    for obj, attr, struct in (
        (ex["f"], "_func", "wasmtime_func"),
        (ex["memory"], "_memory", "wasmtime_memory"),
        (ex["g"], "_global", "wasmtime_global"),
        (ex["t"], "_table", "wasmtime_table"),
    ):
        assert lowlevel.public_struct_address(obj, struct) == ctypes.addressof(getattr(obj, attr)), struct


def test_the_fallback_trap_and_error_readers_match_wasmtime_py() -> None:
    msg = b"probe"
    assert lowlevel.public_take_trap(int(lowlevel.trap_new(msg, len(msg)))) == lowlevel.take_trap(
        int(lowlevel.trap_new(msg, len(msg)))
    )
    engine = Engine()
    try:
        # A real trap with a code (unreachable), through both readers.
        module = inline(engine, '(func (export "f") (param i32 i32) (result i64) unreachable)')
        store = wasmtime.Store(engine.wasmtime_engine)
        ex = module.pre.instantiate(store).exports(store)
        ctx, func = lowlevel.store_context(store), lowlevel.func_address(ex["f"])
        answers = []
        for reader in (lowlevel.take_trap, lowlevel.public_take_trap):
            slots, trap = (lowlevel.ValRaw * 2)(), ctypes.c_void_p()
            err = lowlevel.func_call_unchecked(ctx, func, ctypes.addressof(slots), 2, ctypes.addressof(trap))
            assert not err and trap.value
            answers.append(reader(trap.value))
        assert answers[0] == answers[1] and answers[0][1] is not None
    finally:
        engine.close()


def test_the_fallback_error_reader_matches_wasmtime_py(engine: Engine) -> None:
    module = inline(engine, '(func (export "f") (param i32 i32) (result i64) (i64.const 0))')
    store = wasmtime.Store(engine.wasmtime_engine)
    ex = module.pre.instantiate(store).exports(store)
    ctx, mem = lowlevel.store_context(store), lowlevel.memory_address(ex["memory"])
    messages = []
    for reader in (lowlevel.take_error, lowlevel.public_take_error):
        prev = ctypes.c_uint64()
        err = lowlevel.memory_grow(ctx, mem, 1 << 40, ctypes.addressof(prev))  # past any bound: an error
        assert err
        messages.append(reader(err))
    assert messages[0] == messages[1] and messages[0]
