"""Guest ABI v1 GPU host calls against the real CPU accelerator backend."""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from tensorwasm.runtime.accel import CpuAccelerator
from tensorwasm.runtime.engine import Engine
from tensorwasm.runtime.errors import BadRequest, GpuMemoryExhausted, InvalidKernelLaunch
from tests.unit.engine_helpers import fixture, inline, pool

IMPORTS = """
  (import "tensorwasm" "gpu_alloc" (func $gpu_alloc (param i64) (result i64)))
  (import "tensorwasm" "gpu_launch" (func $gpu_launch (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "tensorwasm" "last_error" (func $last_error (param i32 i32) (result i32)))
  (import "tensorwasm" "log" (func $log (param i32 i32 i32)))
"""


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    e = Engine()
    yield e
    e.close()


@pytest.fixture
def accel() -> Iterator[CpuAccelerator]:
    a = CpuAccelerator()
    yield a
    a.close()


def _vector_input(a: np.ndarray, b: np.ndarray) -> bytes:
    return struct.pack("<I", len(a)) + a.astype("<f4").tobytes() + b.astype("<f4").tobytes()


def test_vector_add_runs_through_the_gpu_host_calls(engine: Engine, accel: CpuAccelerator) -> None:
    dev = accel.open_tenant("t", cap_bytes=64 << 20)
    p = pool(engine, fixture(engine, "vector_add"), device=dev)
    rng = np.random.default_rng(3)
    for n in (1, 255, 1000, 4096):
        a, b = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
        out = np.frombuffer(p.invoke("vector_add", _vector_input(a, b)), dtype="<f4")
        np.testing.assert_array_equal(out, a + b)
    assert dev.bytes_in_use() == 0  # the guest freed its buffers


def test_gpu_cap_reaches_the_caller_as_a_structured_error(engine: Engine, accel: CpuAccelerator) -> None:
    dev = accel.open_tenant("t", cap_bytes=4 << 20)  # two 2 MiB-granular buffers fit, the third not
    p = pool(engine, fixture(engine, "vector_add"), device=dev)
    n = 1024
    with pytest.raises(GpuMemoryExhausted) as err:
        p.invoke("vector_add", _vector_input(np.ones(n), np.ones(n)))
    assert err.value.limit == 4 << 20
    assert err.value.requested == 2 << 20  # rounded to the pool granularity
    assert err.value.current == 4 << 20
    assert err.value.to_json()["error"]["kind"] == "gpu_memory_exhausted"
    assert dev.bytes_in_use() == 0
    roomy = pool(engine, fixture(engine, "vector_add"), device=accel.open_tenant("u", cap_bytes=None))
    assert len(roomy.invoke("vector_add", _vector_input(np.ones(n), np.ones(n)))) == 4 * n


def test_host_errors_are_negative_codes_with_a_readable_last_error(
    engine: Engine, accel: CpuAccelerator
) -> None:
    m = inline(
        engine,
        """
        (func (export "try_alloc") (param i32 i32) (result i64)
          (local $len i32)
          (i32.store (i32.const 4096) (i32.wrap_i64 (call $gpu_alloc (i64.const 0x1_0000_0000))))
          (local.set $len (call $last_error (i32.const 4100) (i32.const 200)))
          (i64.or (i64.const 0x0000_1000_0000_0000)
                  (i64.extend_i32_u (i32.add (local.get $len) (i32.const 4)))))
        """,
        IMPORTS,
    )
    p = pool(engine, m, device=accel.open_tenant("t", cap_bytes=8 << 20))
    out = p.invoke("try_alloc", b"")  # the guest handled the failure, so the invoke succeeds
    code = struct.unpack_from("<i", out)[0]
    assert code == -3
    assert out[4:].decode().startswith("gpu_memory_exhausted: GPU allocation of 4294967296 bytes refused")
    out = pool(engine, m, device=None).invoke("try_alloc", b"")
    assert struct.unpack_from("<i", out)[0] == -6
    assert out[4:].decode() == "bad_request: tenant 'test' has no GPU access"


def test_unknown_kernel_is_an_invalid_launch(engine: Engine, accel: CpuAccelerator) -> None:
    m = inline(
        engine,
        """
        (data (i32.const 128) "no_such_kernel")
        (func (export "launch") (param i32 i32) (result i64)
          (i32.store (i32.const 256) (i32.const 1)) (i32.store (i32.const 260) (i32.const 1))
          (i32.store (i32.const 264) (i32.const 1)) (i32.store (i32.const 268) (i32.const 1))
          (i32.store (i32.const 272) (i32.const 1)) (i32.store (i32.const 276) (i32.const 1))
          (if (i32.lt_s (call $gpu_launch (i32.const 128) (i32.const 14) (i32.const 256)
                                          (i32.const 512) (i32.const 0) (i32.const 0)) (i32.const 0))
            (then unreachable))
          (i64.const 0))
        """,
        IMPORTS,
    )
    p = pool(engine, m, device=accel.open_tenant("t", cap_bytes=None))
    with pytest.raises(InvalidKernelLaunch, match="no_such_kernel"):
        p.invoke("launch", b"")


def test_gpu_calls_without_a_device_fail_cleanly(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "vector_add"), device=None)
    with pytest.raises(BadRequest, match="has no GPU access"):
        p.invoke("vector_add", _vector_input(np.ones(4), np.ones(4)))


def test_guest_log_lines_reach_the_host_log(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    m = inline(
        engine,
        """
        (data (i32.const 128) "hello from wasm")
        (func (export "say") (param i32 i32) (result i64)
          (call $log (i32.const 2) (i32.const 128) (i32.const 15)) (i64.const 0))
        """,
        IMPORTS,
    )
    with caplog.at_level(logging.INFO, logger="tensorwasm.guest"):
        pool(engine, m).invoke("say", b"")
    assert any("hello from wasm" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
