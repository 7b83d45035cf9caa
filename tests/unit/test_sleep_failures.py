"""Sleep and wake when things fail: an I/O error during a wake, a capture that keeps failing, a
sleeper the shard already unloaded.

The `Sleeper` runs for real over a real `Residency` (the GPU budget ledger); only what would need a
GPU, an engine or a disk is faked: the shard's open/close (each open reserves room first and yields a
device counted open until its close gives the room back), the snapshot capture and restore, and the
store. Every test checks the ledger's invariant: room is reserved exactly for the devices open.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tensorwasm.runtime import metrics, sleep
from tensorwasm.runtime.errors import Overloaded, TenantNotReady
from tensorwasm.runtime.sleep import UNLOADED, WAKE_FAILED, Sleeper, SleepParts, SleepRecord
from tensorwasm.runtime.tenancy.idle import FAILED_VICTIM_SKIP_S, Residency
from tests.conftest import wait_for

CAP = 100
DIGEST = "d" * 64


@dataclass
class Device:
    name: str
    closed: bool = False


class Pool:
    def __init__(self) -> None:
        self.calls = 0

    def invoke(self, function: str, payload: Any) -> bytes:
        self.calls += 1
        return b"ok"


@dataclass
class Records:
    saved: dict[str, SleepRecord] = field(default_factory=dict)

    def write(self, key: str, record: SleepRecord) -> None:
        self.saved[key] = record

    def read(self, key: str) -> SleepRecord | None:
        return self.saved.get(key)

    def remove(self, key: str) -> None:
        self.saved.pop(key, None)

    def claim(self, key: str, namespace: str) -> None:  # filing the key under its namespace (the sweep's)
        pass


class Store:
    def __init__(self) -> None:
        self.deleted: list[str] = []

    def path_of(self, key: str, digest: str) -> Path:
        return Path("/nonexistent") / key / digest

    def delete(self, key: str, digest: str) -> None:
        self.deleted.append(digest)


class Shard:
    """The shard's open/close as runtime/shard.py does them: reserve, then open; close, then release."""

    def __init__(self, budget: int | None = None, clock: Any = None) -> None:
        self.residency = Residency(budget, clock) if clock is not None else Residency(budget)
        self.devices: list[Device] = []
        self.records = Records()
        self.store = Store()
        self.notes: list[tuple[str, bool, str]] = []

    def open(self, cfg: Any, module: Any) -> tuple[Pool, Device]:
        self.residency.admit(cfg.name, CAP, 1.0)
        device = Device(cfg.name)
        self.devices.append(device)
        return Pool(), device

    def close(self, name: str, pool: Any, device: Device | None) -> None:
        assert device is not None
        device.closed = True
        self.residency.release(name)

    def parts(self) -> SleepParts:
        return SleepParts(
            cast(Any, self.store), cast(Any, self.records), self.residency, None, cast(Any, self.open),
            cast(Any, self.close),
            lambda name, asleep, message, generation: self.notes.append((name, asleep, message)),
        )  # fmt: skip

    def open_now(self) -> list[str]:
        return [d.name for d in self.devices if not d.closed]

    def consistent(self) -> None:
        """Room is reserved for exactly the tenants with a device open."""
        held = {n for n in self.open_now() if self.residency.holds(n)}
        assert held == set(self.open_now())
        assert self.residency.used == CAP * len(self.open_now())


def config(name: str) -> Any:
    return SimpleNamespace(
        name=name, uid=f"uid-{name}", namespace="", generation=1, idle_prewarm=None,
        module=SimpleNamespace(sha256="0" * 64), limits=SimpleNamespace(linear_memory_bytes=1 << 20),
    )  # fmt: skip


def asleep(shard: Shard, name: str) -> Sleeper:
    cfg = config(name)
    record = SleepRecord(DIGEST, cfg.module.sha256, 1, name, 0.0)
    shard.records.write(sleep.sleep_key(cfg), record)
    return Sleeper(shard.parts(), cfg, cast(Any, object()), None, None, record=record)


def awake(shard: Shard, name: str) -> Sleeper:
    cfg = config(name)
    pool, device = shard.open(cfg, None)
    return Sleeper(shard.parts(), cfg, cast(Any, object()), cast(Any, pool), cast(Any, device))


def counted(metric: str, labels: dict[str, str]) -> float:
    return metrics.REGISTRY.get_sample_value(metric, labels) or 0.0


# --- F11: a wake whose restore fails on I/O ---


def test_a_wake_failing_on_io_closes_its_device_keeps_the_state_and_a_later_wake_restores_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shard = Shard(budget=CAP)
    sleeper = asleep(shard, "a")
    restores: list[str] = []

    def broken(path: Path, **_: Any) -> Any:
        restores.append(path.name)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sleep, "restore_snapshot", broken)
    failed_before = counted("tensorwasm_tenant_wakes_total", {"source": "failed"})
    for attempt in range(1, 4):
        with pytest.raises(TenantNotReady) as refused:
            sleeper.invoke("add", b"")
        assert refused.value.details["reason"] == WAKE_FAILED
        assert refused.value.details["retry_after_s"] > 0  # retryable: the state is kept
        assert "state is kept" in refused.value.message
        assert len(shard.devices) == attempt  # each attempt opened one device ...
        assert shard.open_now() == []  # ... and closed it again
        shard.consistent()
        assert shard.residency.used == 0
        assert sleeper.asleep and sleeper.digest == DIGEST  # blob and record kept for the retry
        assert shard.records.read(sleeper.key) is not None
    assert restores == [DIGEST] * 3
    assert shard.store.deleted == []
    assert counted("tensorwasm_tenant_wakes_total", {"source": "failed"}) == failed_before + 3

    monkeypatch.setattr(sleep, "restore_snapshot", lambda path, **_: SimpleNamespace(source="file"))
    assert sleeper.invoke("add", b"") == b"ok"  # the disk came back: woken from the same blob
    assert shard.open_now() == ["a"] and not sleeper.asleep
    shard.consistent()
    assert shard.records.read(sleeper.key) is None


def test_requests_waiting_for_a_wake_that_failed_on_io_fail_with_it_instead_of_retrying_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shard = Shard(budget=CAP)
    sleeper = asleep(shard, "a")
    entered, release = threading.Event(), threading.Event()
    restores: list[int] = []

    def slow_broken(path: Path, **_: Any) -> Any:
        restores.append(1)
        entered.set()
        assert release.wait(30)
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(sleep, "restore_snapshot", slow_broken)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            sleeper.invoke("add", b"")
        except TenantNotReady as exc:
            errors.append(exc)

    lock = CountingLock()
    sleeper._lock = cast(Any, lock)
    first = threading.Thread(target=call)
    first.start()
    assert entered.wait(30)  # the first request holds the lock, inside the restore
    waiters = [threading.Thread(target=call) for _ in range(3)]
    for t in waiters:
        t.start()
    wait_for(lambda: lock.attempts == 4, 30, "the three waiters blocked on the wake's lock")
    release.set()
    for t in [first, *waiters]:
        t.join(30)
        assert not t.is_alive()
    assert len(errors) == 4 and restores == [1]  # one attempt at the disk, four clear answers
    assert shard.open_now() == [] and shard.residency.used == 0


class CountingLock:
    """The sleeper's lock, counting the acquisitions begun (a waiter has read the wake epoch then)."""

    def __init__(self) -> None:
        self.inner = threading.Lock()
        self.attempts = 0

    def acquire(self, blocking: bool = True) -> bool:
        self.attempts += 1  # only the test's threads; each increments before it may block
        return self.inner.acquire(blocking)

    def release(self) -> None:
        self.inner.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- N2: a sleeper the shard has unloaded ---


def test_a_closed_sleeper_never_opens_a_device_again() -> None:
    shard = Shard(budget=CAP)
    sleeper = asleep(shard, "a")
    sleeper.close(forget=False)  # the shard's _unload, between Shard.wake's lookup and wake_now
    with pytest.raises(TenantNotReady) as late:
        sleeper.wake_now()
    assert late.value.details["reason"] == UNLOADED
    with pytest.raises(TenantNotReady):
        sleeper.invoke("add", b"")
    assert not sleeper.prewarm(CAP, (0, 0))
    assert shard.devices == [] and shard.residency.used == 0
    assert shard.records.read(sleeper.key) is not None  # closed without forget: it sleeps on


def test_an_awake_sleeper_closed_gives_its_room_back_and_stays_closed() -> None:
    shard = Shard(budget=CAP)
    sleeper = awake(shard, "a")
    assert sleeper.invoke("add", b"") == b"ok"
    sleeper.close(forget=True)
    assert shard.open_now() == [] and shard.residency.used == 0
    with pytest.raises(TenantNotReady):
        sleeper.wake_now()
    assert len(shard.devices) == 1


# --- F20: a capture that fails ---


def failing_capture(calls: list[str]) -> Any:
    def capture(store: Any, **kw: Any) -> Any:
        calls.append(kw["tenant"])
        raise OSError(errno.ENOSPC, "No space left on device")

    return capture


def test_a_failed_capture_backs_off_and_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    shard = Shard(budget=CAP)
    sleeper = awake(shard, "a")
    calls: list[str] = []
    monkeypatch.setattr(sleep, "capture_snapshot", failing_capture(calls))
    before = counted("tensorwasm_tenant_sleep_failures_total", {"reason": "idle"})
    assert not sleeper.try_sleep("idle")
    assert sleeper.sleep_backing_off()
    for _ in range(5):  # the idle scan's next passes: refused without copying the state again
        assert not sleeper.try_sleep("idle")
    assert calls == ["a"]
    assert counted("tensorwasm_tenant_sleep_failures_total", {"reason": "idle"}) == before + 1
    assert not sleeper.asleep and shard.open_now() == ["a"]
    shard.consistent()

    first = sleeper._sleep_retry_at
    sleeper._sleep_retry_at = 0.0  # the backoff ran out
    assert not sleeper.try_sleep("idle") and calls == ["a", "a"]
    assert sleeper._sleep_retry_at - first > sleep.SLEEP_RETRY_S / 2  # doubled: retried later still

    result = SimpleNamespace(digest="e" * 64, hot=False, manifest=SimpleNamespace(raw_bytes=8))
    monkeypatch.setattr(sleep, "capture_snapshot", lambda store, **kw: result)
    sleeper._sleep_retry_at = 0.0
    assert sleeper.try_sleep("idle") and sleeper.asleep  # the disk has room again
    assert not sleeper.sleep_backing_off()
    assert shard.open_now() == [] and shard.residency.used == 0


class Clock:
    """Each reading is a little later, so a deadline passes after a bounded number of looks."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.01
        return self.t


def test_a_victim_whose_capture_failed_is_not_captured_again_until_its_skip_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    shard = Shard(budget=CAP, clock=clock)
    victim = awake(shard, "victim")
    calls: list[str] = []
    monkeypatch.setattr(sleep, "capture_snapshot", failing_capture(calls))
    monkeypatch.setattr(Sleeper, "sleep_backing_off", lambda self: False)  # only the ledger's skip
    with pytest.raises(Overloaded):
        shard.residency.admit("newcomer", CAP, timeout_s=1.0)  # ~100 looks at the clock
    assert calls == ["victim"]  # one capture, not one per look until the deadline
    assert shard.open_now() == ["victim"]
    shard.consistent()

    clock.t += FAILED_VICTIM_SKIP_S
    result = SimpleNamespace(digest="e" * 64, hot=False, manifest=SimpleNamespace(raw_bytes=8))
    monkeypatch.setattr(sleep, "capture_snapshot", lambda store, **kw: result)
    shard.residency.admit("newcomer", CAP, timeout_s=1.0)  # chosen again: it sleeps now
    assert victim.asleep and shard.open_now() == []
    assert shard.residency.holds("newcomer") and shard.residency.used == CAP


def test_a_newcomer_passes_over_a_failed_victim_to_the_next_idle_one(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    shard = Shard(budget=2 * CAP, clock=clock)
    old, young = awake(shard, "old"), awake(shard, "young")
    old._used, young._used = 1.0, 2.0  # old is the least recently used: chosen first
    calls: list[str] = []
    result = SimpleNamespace(digest="e" * 64, hot=False, manifest=SimpleNamespace(raw_bytes=8))

    def capture(store: Any, **kw: Any) -> Any:
        calls.append(kw["tenant"])
        if kw["tenant"] == "old":
            raise OSError(errno.ENOSPC, "No space left on device")
        return result

    monkeypatch.setattr(sleep, "capture_snapshot", capture)
    shard.residency.admit("newcomer", CAP, timeout_s=1.0)
    assert calls == ["old", "young"]
    assert young.asleep and not old.asleep
    assert shard.residency.used == 2 * CAP and shard.open_now() == ["old"]
