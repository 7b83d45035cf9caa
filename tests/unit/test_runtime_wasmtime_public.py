"""The engine on wasmtime-py's public API alone (lowlevel.PUBLIC), and the shape of the private one.

The whole invoke path (compile, instantiate, tw_alloc, call, host calls, traps, deadlines, reset,
state capture and restore) runs with every private-layer entry point replaced by one that fails the
test, and answers exactly what the private layer answers. The shape test fails, naming what moved,
when an upgrade of wasmtime-py changes a private type or signature lowlevel.py relies on (the
names themselves: test_runtime_wasmtime_private.py).
"""

from __future__ import annotations

import ctypes
import inspect
import struct
from collections.abc import Callable
from typing import Any

import pytest
import wasmtime
from wasmtime import _ffi as ffi

from tensorwasm.runtime.engine import Engine, WasmState, lowlevel
from tensorwasm.runtime.errors import BadRequest, RuntimeFault
from tests.unit.engine_helpers import fixture, inline, one_of_each_export, pool

# Every entry point of the private layer: the namespace an Engine runs on and the module's own names.
PRIVATE_ENTRY_POINTS = tuple(
    name for name, value in vars(lowlevel.PRIVATE).items() if callable(value) and not isinstance(value, type)
)
# Every C function lowlevel declares on libwasmtime (memmove_quick is libc's), and its helpers around them.
_C_FUNCTIONS = tuple(
    name
    for name, value in vars(lowlevel).items()
    if isinstance(value, ctypes._CFuncPtr) and name != "memmove_quick"
)
PRIVATE_MODULE_NAMES = (
    *_C_FUNCTIONS, "store_context", "func_address", "memory_address", "global_address", "table_address",
    "take_trap", "take_error", "public_take_trap", "public_take_error", "public_store_context",
)  # fmt: skip

LOGGER_IMPORTS = """(import "tensorwasm" "log" (func $log (param i32 i32 i32)))
  (import "tensorwasm" "last_error" (func $last_error (param i32 i32) (result i32)))"""
LOGGER = """(data (i32.const 16) "hello from the guest")
  (func (export "chat") (param i32 i32) (result i64)
    (call $log (i32.const 1) (i32.const 16) (i32.const 20))
    (i64.extend_i32_u (call $last_error (i32.const 64) (i32.const 16))))
  (func (export "spam") (param i32 i32) (result i64)
    (loop $l (call $log (i32.const 1) (i32.const 16) (i32.const 5)) (br $l))
    (i64.const 0))
  (func (export "bad_range") (param i32 i32) (result i64)
    (call $log (i32.const 1) (i32.const -16) (i32.const 64))
    (i64.or (i64.const 0x40_0000_0000)
      (i64.extend_i32_u (call $last_error (i32.const 64) (i32.const 200)))))"""


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        return ("ok", fn())
    except RuntimeFault as fault:
        return ("fault", fault.kind, fault.message)


def scenario(engine: Engine) -> list[Any]:
    """What a user of the engine sees, step by step (results and faults)."""
    seen: list[Any] = []
    echo = pool(engine, fixture(engine, "echo"), memory_bytes=16 << 20)
    big = bytes(range(256)) * 8192  # 2 MiB: the guest grows memory, the instance is replaced after
    for payload in (b"hello", b"", big, b"again"):
        seen.append(_outcome(lambda p=payload: echo.invoke("echo", p) == p))
    values = [5, -7, 1 << 30, 123456]
    total = pool(engine, fixture(engine, "sum"))
    seen.append(_outcome(lambda: struct.unpack("<q", total.invoke("sum", struct.pack("<4i", *values)))[0]))
    stateful = pool(engine, fixture(engine, "stateful"), max_instances=2)
    seen += [_outcome(lambda: struct.unpack("<3i", stateful.invoke("bump", b""))) for _ in range(5)]
    state = stateful.capture_state()
    seen.append(state.globals)
    stateful.restore_state(WasmState(memory=state.memory, globals=[(n, vt, 3) for n, vt, _ in state.globals]))
    seen.append(_outcome(lambda: struct.unpack("<3i", stateful.invoke("bump", b""))))
    seen.append(stateful.capture_state().globals)
    trap = pool(engine, inline(engine, '(func (export "f") (param i32 i32) (result i64) unreachable)'))
    seen.append(_outcome(lambda: trap.invoke("f", b"x")))
    seen.append(_outcome(lambda: trap.invoke("f", b"x")))  # the pool replaced the instance: same answer
    runaway = pool(engine, fixture(engine, "runaway"), timeout_s=0.2)
    seen.append(_outcome(lambda: runaway.invoke("spin", b"")))
    seen.append(_outcome(lambda: runaway.invoke("ok", b"")))
    talk = pool(engine, inline(engine, LOGGER, LOGGER_IMPORTS), host_calls_per_invoke=50)
    for name in ("chat", "spam", "bad_range", "chat"):
        seen.append(_outcome(lambda n=name: talk.invoke(n, b"")))
    for name in ("memory_bomb", "recursion"):
        module = fixture(engine, name)
        p = pool(engine, module, memory_bytes=2 << 20)
        seen += [_outcome(lambda p=p, f=f: p.invoke(f, b"")) for f in p.functions()]
    return seen


def _sabotage(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    used: list[str] = []

    def trap(name: str) -> Callable[..., Any]:
        def call(*_args: Any, **_kwargs: Any) -> Any:
            used.append(name)
            raise AssertionError(f"the private wasmtime layer was used: {name}")

        return call

    for name in PRIVATE_ENTRY_POINTS:
        monkeypatch.setattr(lowlevel.PRIVATE, name, trap(f"PRIVATE.{name}"))
    for name in PRIVATE_MODULE_NAMES:
        monkeypatch.setattr(lowlevel, name, trap(name))
    return used


def test_the_whole_invoke_path_runs_on_the_public_api_alone_and_answers_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    private = Engine(wasmtime_api="private")
    try:
        assert private.ll is lowlevel.PRIVATE
        expected = scenario(private)
    finally:
        private.close()
    used = _sabotage(monkeypatch)
    public = Engine(wasmtime_api="public")
    try:
        assert public.ll is lowlevel.PUBLIC
        got = scenario(public)
    finally:
        public.close()
    assert used == []
    assert got == expected
    # The scenario meets every kind of answer it is there for (so equal lists are not equally empty).
    kinds = {step[1] if step[0] == "fault" else "ok" for step in got if isinstance(step, tuple)}
    assert {"ok", "guest_trap", "deadline_exceeded", "guest_limit_exceeded"} <= kinds, kinds
    # bad_range's log call failed (range outside memory) and the guest read the reason back.
    assert any(
        step[0] == "ok" and b"outside linear memory" in step[1]
        for step in got
        if isinstance(step, tuple) and isinstance(step[1], bytes)
    ), got


def test_the_sabotage_covers_the_c_path() -> None:
    assert {
        "func_call_unchecked",
        "set_epoch_deadline",
        "increment_epoch",
        "memory_data",
        "global_set",
        "linker_define_func_unchecked",
        "trap_new",
        "caller_context",
    } <= set(PRIVATE_MODULE_NAMES)


def test_the_layer_is_chosen_by_flag_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(lowlevel.API_ENV, raising=False)
    assert lowlevel.select() is lowlevel.PRIVATE
    assert lowlevel.select("public") is lowlevel.PUBLIC
    monkeypatch.setenv(lowlevel.API_ENV, "public")
    assert lowlevel.select() is lowlevel.PUBLIC
    assert lowlevel.select("private") is lowlevel.PRIVATE
    monkeypatch.setenv(lowlevel.API_ENV, "fast")
    with pytest.raises(ValueError, match=r"'private' or 'public'.*TENSORWASM_RUNTIME_WASMTIME_API"):
        lowlevel.select()
    with pytest.raises(BadRequest, match="'private' or 'public'"):
        Engine(wasmtime_api="ctypes")


def test_public_handles_do_not_outlive_their_objects() -> None:
    engine = Engine(wasmtime_api="public")
    try:
        p = pool(engine, fixture(engine, "echo"), max_instances=1)
        assert p.invoke("echo", b"x") == b"x"
        before = len(lowlevel.PUBLIC._objects)
        for _ in range(20):  # a trap replaces the instance each time: its store and exports go
            with pytest.raises(RuntimeFault):
                p.invoke("echo", b"y" * (64 << 20))
        assert len(lowlevel.PUBLIC._objects) <= before + 8
        assert lowlevel.PUBLIC._pending == {}
    finally:
        engine.close()


# --- the shape of the private API (wasmtime-py 50), loud on an upstream change ---


def test_the_private_layer_loaded() -> None:
    assert lowlevel.PRIVATE_UNAVAILABLE is None, lowlevel.PRIVATE_UNAVAILABLE


@pytest.mark.parametrize(
    ("name", "size", "fields"),
    [
        # wasmtime.h v50: what lowlevel passes by address to the C API as the object.
        ("wasmtime_func_t", 16, ("store_id", "__private")),
        ("wasmtime_memory_t", 24, ("_anon_1", "__private2")),
        ("wasmtime_global_t", 24, ("store_id", "__private1", "__private2", "__private3")),
        ("wasmtime_table_t", 24, ("_anon_1", "__private2")),
        ("wasmtime_val_raw_t", 16, ("i32", "i64", "f32", "f64", "v128")),
        ("wasmtime_val_t", 32, ("kind", "of")),
    ],
)
def test_private_structs_keep_their_layout(name: str, size: int, fields: tuple[str, ...]) -> None:
    struct_type = getattr(ffi, name, None)
    assert struct_type is not None, f"wasmtime._ffi.{name} is gone: port engine/lowlevel.py"
    assert ctypes.sizeof(struct_type) == size, f"wasmtime._ffi.{name} changed size: port engine/lowlevel.py"
    names = tuple(f[0] for f in struct_type._fields_)
    assert names[: len(fields)] == fields, (
        f"wasmtime._ffi.{name} fields are now {names}: port engine/lowlevel.py"
    )


def test_private_objects_hold_those_structs(engine: Engine) -> None:
    _store, ex = one_of_each_export(engine)  # the store outlives the objects read below
    for obj, attr, struct_name in (
        (ex["f"], "_func", "wasmtime_func_t"),
        (ex["memory"], "_memory", "wasmtime_memory_t"),
        (ex["g"], "_global", "wasmtime_global_t"),
        (ex["t"], "_table", "wasmtime_table_t"),
    ):
        held = getattr(obj, attr, None)
        assert type(held) is getattr(ffi, struct_name), f"{type(obj).__name__}.{attr} is not a {struct_name}"


def test_private_signatures_keep_their_shape() -> None:
    callback = ffi.wasmtime_func_unchecked_callback_t
    assert callback._restype_ in (ctypes.c_size_t, ctypes.c_void_p, ctypes.c_ulong), callback._restype_
    assert len(callback._argtypes_) == 4, "wasmtime_func_unchecked_callback_t takes (env, caller, args, n)"
    for cls in (wasmtime.Trap, wasmtime.WasmtimeError):
        params = list(inspect.signature(cls._from_ptr).parameters)
        assert params == ["ptr"], f"{cls.__name__}._from_ptr now takes {params}: port engine/lowlevel.py"
    assert list(inspect.signature(wasmtime.Store._context).parameters) == ["self"], "Store._context() changed"
    assert isinstance(ffi.dll, ctypes.CDLL) and isinstance(ffi.dll._name, str), "wasmtime._ffi.dll changed"
