"""Sleep records are signed with the snapshot key ring and judged at wake (review N7): a record edited
to name an older signed sleep blob of the same tenant (kept as a copy) is refused, the tenant
restarts from its module and nothing is deleted; a good record wakes, across a restart too; without
keys records stay unsigned and work as before. A real shard (CPU backend), a real store on disk."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from tensorwasm.runtime.shard import ASLEEP, LOADED
from tensorwasm.runtime.sleep import SleepRecord, SleepRecords, check_record, record_message
from tensorwasm.runtime.snapshots import signing
from tensorwasm.runtime.snapshots.signing import KeyRing, SigningPolicy
from tensorwasm.runtime.snapshots.store import SnapshotStore
from tests.runtime_fixtures import RuntimeServer, start_runtime_server
from tests.unit.test_runtime_sleep import add, counter, reason

K1 = b"1" * 32
SIGNED = SigningPolicy("verify-if-present", ring=KeyRing({"k1": K1}, active="k1"))


@pytest.fixture
def policy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    def use(p: SigningPolicy) -> None:
        monkeypatch.setattr(signing, "POLICY", p)

    yield use


def _serve(store: Path, *configs: Any) -> tuple[Iterator[RuntimeServer], RuntimeServer]:
    running = start_runtime_server(list(configs), sleep_store=SnapshotStore(store))
    return running, next(running)


def _stop(running: Iterator[RuntimeServer]) -> None:
    for _ in running:  # the shard's cleanup
        pass


def _asleep_in(server: RuntimeServer, name: str) -> tuple[str, str]:
    """Put `name` to sleep now: (its sleep key, the blob's digest)."""
    assert server.run(server.shard.sleep(name))
    sleeper = server.shard.served[name].sleeper
    assert sleeper is not None and sleeper.digest
    return sleeper.key, sleeper.digest


def test_a_record_edited_to_name_an_older_blob_is_refused_and_nothing_is_deleted(
    policy: Any, tmp_path: Path
) -> None:
    policy(SIGNED)
    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    running, server = _serve(store, alpha)
    try:
        assert add(server, alpha, 9) == 9
        key, old = _asleep_in(server, "alpha")
        blob_dir = store / "tenants" / key
        kept = tmp_path / "kept-copy.twsnap"
        shutil.copy(blob_dir / f"{old}.twsnap", kept)  # someone with write access keeps a copy
        assert add(server, alpha, 1) == 10  # woken: the state moves on
        _, new = _asleep_in(server, "alpha")
        assert new != old and not (blob_dir / f"{old}.twsnap").exists()  # the old blob went
    finally:
        _stop(running)
    # ... puts it back and points the (signed) record at it: the state at 9 would come back.
    shutil.copy(kept, blob_dir / f"{old}.twsnap")
    path = store / "sleeping" / f"{key}.json"
    raw = json.loads(path.read_text())
    assert raw["key_id"] == "k1" and raw["digest"] == new
    path.write_text(json.dumps(raw | {"digest": old}))
    running, server = _serve(store, alpha)
    try:
        assert reason(server, "alpha") == ASLEEP
        reply = server.invoke(alpha, "add", struct.pack("<q", 1))
        assert reply.status == 503, reply.body
        error = reply.json()["error"]
        assert (error["kind"], error["reason"], error["sleep_record"]) == (
            "tenant_not_ready",
            "WakeFailed",
            "BadSignature",
        )
        assert "restarts from its module" in error["message"] and "kept" in error["message"]
        assert add(server, alpha, 1) == 1  # served again from the module: not the rolled-back 10
        assert reason(server, "alpha") == LOADED
        # Nothing an attacker provoked deleted anything: both blobs and the record are still there.
        assert (blob_dir / f"{old}.twsnap").exists() and (blob_dir / f"{new}.twsnap").exists()
        assert path.exists()
    finally:
        _stop(running)


def test_a_signed_record_wakes_across_a_restart_and_a_stripped_one_naming_an_older_blob_is_refused(
    policy: Any, tmp_path: Path
) -> None:
    policy(SIGNED)
    alpha, beta = counter("alpha", after="1h"), counter("beta", after="1h")
    store = tmp_path / "store"
    running, server = _serve(store, alpha, beta)
    try:
        add(server, alpha, 4)
        add(server, beta, 6)
        _asleep_in(server, "alpha")
        beta_key, old = _asleep_in(server, "beta")
        blob_dir = store / "tenants" / beta_key
        kept = tmp_path / "kept-copy.twsnap"
        shutil.copy(blob_dir / f"{old}.twsnap", kept)
        assert add(server, beta, 1) == 7
        _asleep_in(server, "beta")
    finally:
        _stop(running)
    shutil.copy(
        kept, blob_dir / f"{old}.twsnap"
    )  # the older blob back, the record stripped and pointed at it
    path = store / "sleeping" / f"{beta_key}.json"
    raw = json.loads(path.read_text())
    path.write_text(
        json.dumps({k: v for k, v in raw.items() if k not in ("key_id", "mac")} | {"digest": old})
    )
    running, server = _serve(store, alpha, beta)
    try:
        assert add(server, alpha, 1) == 5  # the good record: woken with its state
        reply = server.invoke(beta, "add", struct.pack("<q", 1))
        assert reply.status == 503 and reply.json()["error"]["sleep_record"] == "Unsigned"
        assert "not the newest sleep snapshot" in reply.json()["error"]["message"]
        assert add(server, beta, 1) == 1  # not the rolled-back 6
    finally:
        _stop(running)


def _old_format(path: Path) -> None:
    """Rewrite a record as the build before record signing wrote it: its 5 fields, no key_id/mac."""
    raw = json.loads(path.read_text())
    path.write_text(
        json.dumps({k: raw[k] for k in ("digest", "module_sha256", "generation", "tenant", "slept_at")})
    )


@pytest.mark.parametrize("mode", ["verify-if-present", "require"])
def test_a_record_written_before_record_signing_wakes_with_its_state_and_is_signed(
    policy: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: Literal["require", "verify-if-present"],
) -> None:
    """Review R3 K1: the upgrade. An old-format record naming the newest signed sleep blob of its
    tenant is adopted (signed at the wake), under both key-ring modes; the state is kept."""
    policy(SigningPolicy(mode, ring=SIGNED.ring))
    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    running, server = _serve(store, alpha)
    try:
        assert add(server, alpha, 41) == 41
        key, digest = _asleep_in(server, "alpha")
    finally:
        _stop(running)
    path = store / "sleeping" / f"{key}.json"
    _old_format(path)
    running, server = _serve(store, alpha)
    try:
        from tensorwasm.runtime.snapshots.restore import restore_snapshot as real

        failures: list[str] = []

        def fails_once(*args: Any, **kwargs: Any) -> Any:
            if not failures:
                failures.append("EIO")
                raise OSError(5, "Input/output error")  # the wake is retried: the record stays
            return real(*args, **kwargs)

        monkeypatch.setattr("tensorwasm.runtime.sleep.restore_snapshot", fails_once)
        reply = server.invoke(alpha, "add", struct.pack("<q", 1))
        assert reply.status == 503 and "kept, retry" in reply.json()["error"]["message"], reply.body
        raw = json.loads(path.read_text())
        assert raw["key_id"] == "k1" and raw["digest"] == digest  # adopted: signed in place
        stored = SleepRecords(SnapshotStore(store)).read(key)
        assert stored is not None
        check_record(key, stored, store / "tenants" / key / f"{digest}.twsnap", signing.current())
        assert add(server, alpha, 1) == 42  # the state at 41 kept across the upgrade
        assert not path.exists()
    finally:
        _stop(running)


def test_without_keys_records_stay_unsigned_and_wake(policy: Any, tmp_path: Path) -> None:
    policy(SigningPolicy("verify-if-present"))  # the default mode, no key ring
    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    running, server = _serve(store, alpha)
    try:
        add(server, alpha, 3)
        key, _ = _asleep_in(server, "alpha")
    finally:
        _stop(running)
    raw = json.loads((store / "sleeping" / f"{key}.json").read_text())
    assert set(raw) == {"digest", "module_sha256", "generation", "tenant", "slept_at"}  # as before
    running, server = _serve(store, alpha)
    try:
        assert add(server, alpha, 1) == 4
    finally:
        _stop(running)


def test_the_mac_covers_the_key_and_every_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signing, "POLICY", SIGNED)
    records = SleepRecords(SnapshotStore(tmp_path))
    record = SleepRecord("a" * 32, "0" * 64, 3, "alpha", 1234.5)
    records.write("uid-a.sleep", record)
    signed = records.read("uid-a.sleep")
    assert signed is not None and signed.key_id == "k1" and len(signed.mac) == 64
    blob = tmp_path / "unused"  # a signed record is judged without reading its blob
    check_record("uid-a.sleep", signed, blob, SIGNED)
    for change in ({"generation": 2}, {"slept_at": 1234.6}, {"tenant": "beta"}, {"module_sha256": "1" * 64}):
        forged = SleepRecord(**(signed.__dict__ | change))
        with pytest.raises(Exception, match="does not match key 'k1'"):
            check_record("uid-a.sleep", forged, blob, SIGNED)
    with pytest.raises(Exception, match="does not match"):  # moved under another tenant's key
        check_record("uid-b.sleep", signed, blob, SIGNED)
    with pytest.raises(Exception, match="not in this shard's key ring"):
        check_record("uid-a.sleep", signed, blob, SigningPolicy("require", ring=KeyRing({"k2": K1}, "k2")))
    check_record("uid-a.sleep", signed, blob, SigningPolicy("off"))  # off: nothing is verified
    unsigned = SleepRecord(**(signed.__dict__ | {"key_id": "", "mac": ""}))
    with pytest.raises(Exception, match="requires signed"):
        check_record("uid-a.sleep", unsigned, blob, SigningPolicy("require", ring=SIGNED.ring))
    assert record_message("uid-a.sleep", record).startswith(b"tensorwasm-sleep-record\n")
