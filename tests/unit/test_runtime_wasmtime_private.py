"""wasmtime-py private API the engine relies on (only engine/lowlevel.py touches it).

Fails loudly, naming the attribute, when an upgrade of wasmtime-py moves one of them: pin the
version (pyproject says `wasmtime>=50,<51`) or port lowlevel.py before anything else breaks.
"""

from __future__ import annotations

import ctypes

import pytest
import wasmtime
from wasmtime import _ffi as ffi

from tensorwasm.runtime.engine import Engine, lowlevel
from tests.unit.engine_helpers import inline


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
