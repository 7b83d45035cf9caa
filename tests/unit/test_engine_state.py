"""Engine snapshot hooks: capture_state / restore_state (bit-exact) and the quiesce barrier."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from tensorwasm.runtime.engine import Engine, WasmState
from tensorwasm.runtime.errors import SnapshotRejected
from tests.conftest import wait_for
from tests.unit.engine_helpers import blocked_at, fixture, in_thread, pool

PAGE = 64 << 10


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    e = Engine()
    yield e
    e.close()


def _state_with(base: WasmState, pages: int, calls: int, hidden: int, counter: int) -> WasmState:
    memory = bytearray(pages * PAGE)
    memory[: len(base.memory)] = base.memory
    memory[64:68] = struct.pack("<i", counter)
    memory[-16:] = b"end-of-memory..."  # a byte pattern in grown pages must survive too
    values = {"calls": calls, "scale": 0.25, "__tw_global_1": hidden}
    return WasmState(memory=bytes(memory), globals=[(n, vt, values[n]) for n, vt, _ in base.globals])


def test_capture_is_the_state_every_invoke_starts_from(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "stateful"))
    p.invoke("bump", b"")
    state = p.capture_state()
    assert len(state.memory) == PAGE
    assert state.memory[64:68] == b"\0\0\0\0"  # the invoke's writes were reset
    assert ("calls", "i32", 0) in state.globals


def test_restore_is_bit_exact_and_grows_memory(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "stateful"), max_instances=3)
    state = _state_with(p.capture_state(), pages=3, calls=41, hidden=9, counter=99)
    p.restore_state(state)
    again = p.capture_state()
    assert bytes(again.memory) == state.memory
    assert sorted(again.globals) == sorted(state.globals)
    for _ in range(6):  # every instance (3) now starts from the restored state, call after call
        assert struct.unpack("<3i", p.invoke("bump", b"")) == (42, 10, 100)


def test_restore_from_a_memoryview(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "stateful"))
    state = _state_with(p.capture_state(), pages=1, calls=1, hidden=2, counter=3)
    p.restore_state(WasmState(memory=memoryview(bytes(state.memory)), globals=state.globals))
    assert struct.unpack("<3i", p.invoke("bump", b"")) == (2, 3, 4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: WasmState(bytes(s.memory) + b"x", s.globals), "whole number of pages"),
        (lambda s: WasmState(bytes(s.memory) * 200, s.globals), "over the tenant's"),
        (lambda s: WasmState(s.memory, s.globals[:-1]), "do not match"),
        (lambda s: WasmState(s.memory, [(n, "i64", v) for n, _, v in s.globals]), "do not match"),
        (lambda s: WasmState(s.memory, [(n, vt, "7") for n, vt, _ in s.globals]), "bad value"),  # type: ignore[misc]
    ],
)
def test_bad_states_are_rejected_and_change_nothing(engine: Engine, change, message: str) -> None:  # type: ignore[no-untyped-def]
    p = pool(engine, fixture(engine, "stateful"), memory_bytes=4 << 20)
    before = p.capture_state()
    with pytest.raises(SnapshotRejected, match=message):
        p.restore_state(change(before))
    after = p.capture_state()
    assert (after.memory, after.globals) == (before.memory, before.globals)
    assert struct.unpack("<3i", p.invoke("bump", b"")) == (1, 1, 1)


def test_quiesce_waits_for_in_flight_invokes_and_holds_new_ones(engine: Engine) -> None:
    p = pool(engine, fixture(engine, "runaway"), timeout_s=0.3, max_instances=2)
    events: list[str] = []
    spinner = in_thread(lambda: p.invoke("spin", b""), events, "spin")
    # The spinner has its instance once one of the two left the idle queue (observable, not timed;
    # a spinner already done, on a very slow machine, leaves the same assertions true).
    wait_for(lambda: p._idle.qsize() == 1 or not spinner.is_alive(), 60, "the spinner ran", interval=0.005)
    with p.quiesce():
        assert len(p._held) == 2  # the barrier waited for the spinner to give its instance back
        spinner.join(60)
        events.append("barrier")
        late = in_thread(lambda: p.invoke("ok", b"", timeout_s=60), events, "late")
        # Held: blocked waiting for a free instance while the barrier holds both (state, not time).
        wait_for(
            lambda: blocked_at(late, "invoke", "self._idle.get(timeout"),
            60,
            "the late invoke waiting",
            interval=0.005,
        )
        assert events == ["spin:deadline_exceeded", "barrier"]
        with p.quiesce():  # reentrant for the holder (capture/restore inside a barrier)
            p.capture_state()
    late.join(timeout=60)
    assert events == ["spin:deadline_exceeded", "barrier", "late"]
