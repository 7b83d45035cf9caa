"""Engine: compile (validation, limits, disk cache), the call path, reset and thread safety."""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from tensorwasm.runtime.engine import Engine, GuestLimits
from tensorwasm.runtime.errors import BadRequest, ModuleRejected, NotFound
from tests.unit.engine_helpers import FIXTURES, compile_bytes, fixture, inline, pool


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    e = Engine(cache_dir=tmp_path_factory.mktemp("cache"))
    yield e
    e.close()


def test_echo_round_trips_bytes_of_any_size(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "echo"), memory_bytes=16 << 20)
    assert p.functions() == ["echo"]
    assert p.invoke("echo", b"hello") == b"hello"
    assert p.invoke("echo", b"") == b""
    big = bytes(range(256)) * 8192  # 2 MiB: the guest grows memory, the instance is replaced after
    assert p.invoke("echo", big) == big
    assert p.invoke("echo", bytearray(b"again")) == b"again"


def test_sum_adds_little_endian_i32s(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "sum"))
    assert set(p.functions()) == {"sum", "noop"}
    values = [5, -7, 1 << 30, 123456]
    out = p.invoke("sum", struct.pack(f"<{len(values)}i", *values))
    assert struct.unpack("<q", out)[0] == sum(values)


def test_unknown_function_is_not_found(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "echo"))
    for name in ("nope", "tw_alloc", "memory", "__tw_global_0"):
        with pytest.raises(NotFound, match=repr(name)):
            p.invoke(name, b"")


def test_every_invoke_starts_from_a_reset_instance(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "stateful"), max_instances=2)
    # bump changes an exported i32, an exported f64, a hidden global and memory; it reports what it saw.
    for _ in range(20):
        assert struct.unpack("<3i", p.invoke("bump", b"")) == (1, 1, 1)
    assert p.capture_state().globals == [
        ("calls", "i32", 0),
        ("scale", "f64", 1.5),
        ("__tw_global_1", "i32", 0),
    ]


def test_binary_and_text_modules_both_compile(engine: Engine) -> None:
    text = (FIXTURES / "sum.wat").read_text()
    binary = bytes(wasmtime.wat2wasm(text))
    a, b = compile_bytes(engine, binary), compile_bytes(engine, text.encode())
    assert a.functions == b.functions == ("sum", "noop")
    assert pool(engine, a).invoke("sum", struct.pack("<2i", 2, 3)) == struct.pack("<q", 5)


def test_compile_cache_is_keyed_by_digest_and_engine_config(tmp_path: Path) -> None:
    data = (FIXTURES / "echo.wat").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    first = Engine(cache_dir=tmp_path)
    try:
        assert not first.compile(data, digest).from_cache
        files = list(tmp_path.glob("*.cwasm"))
        assert [f.name for f in files] == [f"{digest}-{first.fingerprint}.cwasm"]
    finally:
        first.close()
    second = Engine(cache_dir=tmp_path)
    try:
        hit = second.compile(data, digest)
        assert hit.from_cache
        assert pool(second, hit).invoke("echo", b"cached") == b"cached"
        files[0].write_bytes(b"torn artifact")  # a corrupt entry is dropped and rebuilt
        assert not second.compile(data, digest).from_cache
        assert second.compile(data, digest).from_cache
    finally:
        second.close()
    other = Engine(cache_dir=tmp_path, max_wasm_stack=256 << 10)  # another config, another key
    try:
        assert other.fingerprint != second.fingerprint
        assert not other.compile(data, digest).from_cache
    finally:
        other.close()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00asm\x01\x00\x00\x00\x05\xff", "invalid WebAssembly module"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "neither a WebAssembly binary nor WAT"),
        (b"(module (func $f (result i32)))", "invalid WAT|invalid WebAssembly"),
        (b'(module (func (export "tw_alloc") (param i32) (result i32) (i32.const 0)))', "'memory'"),
        (b'(module (memory (export "memory") 1))', "tw_alloc"),
        (
            b'(module (import "env" "f" (func)) (memory (export "memory") 1)'
            b' (func (export "tw_alloc") (param i32) (result i32) (i32.const 0)))',
            r"import env\.f is not part of guest ABI v1",
        ),
        (
            b'(module (import "tensorwasm" "gpu_alloc" (func (param i32) (result i32)))'
            b' (memory (export "memory") 1)'
            b' (func (export "tw_alloc") (param i32) (result i32) (i32.const 0)))',
            r"tensorwasm\.gpu_alloc has the wrong signature: expected \(i64\) -> \(i64\)",
        ),
        (
            b'(module (memory (export "memory") 1) (func (export "tw_alloc") (param i32) (result i32)'
            b' (i32.const 0)) (func (export "tw_init")))',
            "tw_init",
        ),
    ],
)
def test_bad_modules_are_rejected_with_a_reason(engine: Engine, data: bytes, message: str) -> None:
    with pytest.raises(ModuleRejected, match=message):
        compile_bytes(engine, data)


def test_digest_mismatch_and_size_limit_are_rejected(tmp_path: Path) -> None:
    data = (FIXTURES / "echo.wat").read_bytes()
    small = Engine(max_module_bytes=100)
    try:
        with pytest.raises(ModuleRejected, match=r"over the 100 byte limit"):
            small.compile(data, hashlib.sha256(data).hexdigest())
        with pytest.raises(ModuleRejected, match="does not match"):
            small.compile(b"(module)", "0" * 64)
    finally:
        small.close()


def test_initial_memory_over_the_tenant_limit_is_rejected(engine: Engine) -> None:
    m = compile_bytes(
        engine,
        b'(module (memory (export "memory") 32)'
        b' (func (export "tw_alloc") (param i32) (result i32) (i32.const 0)))',
    )
    with pytest.raises(ModuleRejected, match="over the tenant's 1048576 byte limit"):
        pool(engine, m, memory_bytes=1 << 20)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(BadRequest, match="timeout"):
        GuestLimits(timeout_s=0)
    with pytest.raises(BadRequest, match="linear memory"):
        GuestLimits(memory_bytes=100)
    with pytest.raises(BadRequest, match="max instances"):
        GuestLimits(max_instances=0)


def test_tw_init_state_is_the_baseline_of_every_instance(engine: Engine) -> None:
    m = inline(
        engine,
        """
        (global $seed (export "seed") (mut i32) (i32.const 0))
        (func (export "tw_init") (result i32)
          (global.set $seed (i32.const 7)) (i32.store (i32.const 2048) (i32.const 99)) (i32.const 0))
        (func (export "read") (param i32 i32) (result i64)
          (i32.store (i32.const 2056) (i32.load (i32.const 2048)))
          (i32.store (i32.const 2060) (global.get $seed))
          (global.set $seed (i32.const -1)) (i32.store (i32.const 2048) (i32.const -1))
          (i64.const 0x0000_0808_0000_0008))
        """,
    )
    p = pool(engine, m, max_instances=3)
    results = {p.invoke("read", b"") for _ in range(10)}
    assert results == {struct.pack("<2i", 99, 7)}


def test_invoke_is_thread_safe_across_a_shared_pool(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "sum"), max_instances=4)
    errors: list[str] = []

    def worker(k: int) -> None:
        for i in range(300):
            vals = (k, i, k * i)
            got = struct.unpack("<q", p.invoke("sum", struct.pack("<3i", *vals)))[0]
            if got != sum(vals):
                errors.append(f"thread {k} call {i}: {got} != {sum(vals)}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize(("pages", "drops_pages"), [(1, False), (8, True)])
def test_reset_restores_data_globals_and_scribbled_pages(
    engine: Engine, pages: int, drops_pages: bool
) -> None:
    data_at, word_at = pages * 65536 - 5000, pages * 65536 - 10000
    m = compile_bytes(
        engine,
        f"""(module (memory (export "memory") {pages})
        (func (export "tw_alloc") (param i32) (result i32) (i32.const 4096))
        (data (i32.const {data_at}) "pristine")
        (global $g (mut i32) (i32.const 5))
        (func (export "scribble") (param i32 i32) (result i64)
          (i64.store (i32.const 1024) (i64.load (i32.const {data_at})))
          (i32.store (i32.const 1032) (global.get $g))
          (i32.store (i32.const 1036) (i32.load (i32.const {word_at})))
          (i64.store (i32.const {data_at}) (i64.const -1))
          (i32.store (i32.const {word_at}) (i32.const 77))
          (i32.store (i32.const 2000) (i32.const 1))
          (global.set $g (i32.const 9))
          (i64.const 0x0000_0400_0000_0010)))""".encode(),
    )
    p = pool(engine, m, max_instances=2)
    # Small memories are copied back; large pristine ones drop their dirty pages (one madvise).
    assert p._zap is drops_pages
    expected = b"pristine" + struct.pack("<2i", 5, 0)
    for _ in range(10):
        assert p.invoke("scribble", b"input") == expected
    # After a restore the baseline is no longer the module image: resets copy it back instead.
    state = p.capture_state()
    memory = bytearray(state.memory)
    memory[data_at : data_at + 8] = b"restored"
    p.restore_state(type(state)(memory=bytes(memory), globals=[(n, vt, 6) for n, vt, _ in state.globals]))
    assert p._zap is False
    for _ in range(4):
        assert p.invoke("scribble", b"") == b"restored" + struct.pack("<2i", 6, 0)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("(start $boom) (func $boom unreachable)", "module failed to start: .*unreachable"),
        ('(func (export "tw_init") (result i32) (i32.const -1))', "tw_init failed: guest_trap: .*code -1"),
        (
            '(func (export "tw_init") (result i32) (loop $l (br $l)) (i32.const 0))',
            "tw_init failed: deadline",
        ),
    ],
)
def test_modules_that_fail_to_start_are_rejected(engine: Engine, body: str, message: str) -> None:
    m = inline(engine, body)
    with pytest.raises(ModuleRejected, match=message):
        pool(engine, m, timeout_s=0.05)
