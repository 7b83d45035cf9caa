"""Helpers shared by the engine tests: compile a fixture or inline WAT and build a pool."""

from __future__ import annotations

import hashlib
import linecache
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorwasm.runtime.engine import CompiledModule, Engine, GuestLimits, TenantInstancePool
from tensorwasm.runtime.errors import RuntimeFault

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# Minimal ABI v1 prelude for inline test guests: memory + a constant allocator.
PRELUDE = '(memory (export "memory") 1) (func (export "tw_alloc") (param i32) (result i32) (i32.const 1024))'


def compile_bytes(engine: Engine, data: bytes) -> CompiledModule:
    return engine.compile(data, hashlib.sha256(data).hexdigest())


def fixture(engine: Engine, name: str) -> CompiledModule:
    return compile_bytes(engine, (FIXTURES / f"{name}.wat").read_bytes())


def inline(engine: Engine, body: str, imports: str = "") -> CompiledModule:
    return compile_bytes(engine, f"(module {imports} {PRELUDE} {body})".encode())


def one_of_each_export(engine: Engine) -> tuple[Any, Any]:
    """(store, exports) of an instance exporting a mutable global `g`, a table `t` and a function
    `f`: the wasmtime objects whose private structs engine/lowlevel.py reads."""
    import wasmtime

    module = inline(
        engine,
        '(global (export "g") (mut i32) (i32.const 7)) (table (export "t") 3 funcref)'
        '(func (export "f") (param i32 i32) (result i64) (i64.const 0))',
    )
    store = wasmtime.Store(engine.wasmtime_engine)
    return store, module.pre.instantiate(store).exports(store)


def in_thread(fn: Callable[[], object], done: list[str], tag: str) -> threading.Thread:
    """Start `fn` in a thread; append `tag` (and the error kind, if any) to `done` when it ends."""

    def run() -> None:
        try:
            fn()
            done.append(tag)
        except RuntimeFault as exc:
            done.append(f"{tag}:{exc.kind}")

    t = threading.Thread(target=run)
    t.start()
    return t


def pool(engine: Engine, module: CompiledModule, device: Any = None, **limits: Any) -> TenantInstancePool:
    return TenantInstancePool(engine, module, GuestLimits(**limits), device=device, tenant_id="test")


def inside(thread: threading.Thread, function: str) -> bool:
    """Whether `thread` is now inside a Python function named `function` (anywhere on its stack):
    a blocked or running call observed as state, never guessed from a sleep."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def blocked_at(thread: threading.Thread, function: str, line_part: str) -> bool:
    """Whether `thread`'s innermost Python frame is `function` on a source line containing
    `line_part` (a blocking C call, e.g. a SimpleQueue get, shows as the line calling it)."""
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None or frame.f_code.co_name != function:
        return False
    return line_part in linecache.getline(frame.f_code.co_filename, frame.f_lineno)
