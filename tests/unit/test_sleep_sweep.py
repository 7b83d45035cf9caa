"""Sleep snapshots no Tenant owns are swept; sleepers whose signing key was retired are told so.

A real shard (CPU backend, tests/fixtures/counter.wat: its total lives in a GPU buffer, so a sleeper
that lost or mixed up its state shows in the number it answers) over a real snapshot store.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tensorwasm.runtime import metrics
from tensorwasm.runtime.shard import ASLEEP, LOADED
from tensorwasm.runtime.sleep import CLAIMS_DIR, SWEEP_GRACE_S, SleepRecords
from tensorwasm.runtime.snapshots import signing
from tensorwasm.runtime.snapshots.signing import KeyRing, SigningPolicy
from tensorwasm.runtime.snapshots.store import SnapshotStore
from tensorwasm.runtime.tenancy.config import TenantConfig
from tests.runtime_fixtures import RuntimeServer, start_runtime_server
from tests.unit.test_runtime_sleep import add, counter, reason


def sleep_files(store: Path) -> set[str]:
    """Every sleep record and sleep blob directory in the store, by key."""
    records = {p.name.removesuffix(".json") for p in (store / "sleeping").glob("*")}
    blobs = {p.name for p in (store / "tenants").glob("*.sleep") if any(p.iterdir())}
    return records | blobs


def swept_total() -> float:
    return metrics.REGISTRY.get_sample_value("tensorwasm_sleep_snapshots_swept_total") or 0.0


def shard(store: Path, *configs: TenantConfig, namespace: str = "") -> Iterator[RuntimeServer]:
    return start_runtime_server(list(configs), sleep_store=SnapshotStore(store), namespace=namespace)


def stop(running: Iterator[RuntimeServer]) -> None:
    for _ in running:  # the generator's cleanup stops the shard; its sleepers sleep on
        pass


def put_to_sleep(store: Path, *states: tuple[TenantConfig, int], namespace: str = "") -> None:
    """Serve each tenant, give it a total, put it to sleep, stop the shard."""
    running = shard(store, *(cfg for cfg, _ in states), namespace=namespace)
    server = next(running)
    for cfg, total in states:
        assert add(server, cfg, total) == total
        assert server.run(server.shard.sleep(cfg.name))
    stop(running)


def test_a_tenant_deleted_while_its_shard_was_down_has_its_sleep_snapshot_swept(tmp_path: Path) -> None:
    alpha, beta = counter("alpha", after="1h"), counter("beta", after="1h")
    store = tmp_path / "store"
    put_to_sleep(store, (alpha, 5), (beta, 7))
    assert sleep_files(store) == {"uid-alpha.sleep", "uid-beta.sleep"}
    running = shard(store, beta)  # alpha was deleted while the shard was down
    server = next(running)
    try:
        assert reason(server, "beta") == ASLEEP
        # Within the grace time nothing goes (a tenant assigned after the list may be sleeping).
        before = swept_total()
        young = server.run(server.shard.sweep_sleep_blobs())
        assert young is not None and young.removed == () and young.left == 1
        swept = server.run(server.shard.sweep_sleep_blobs(grace_s=0))
        assert swept is not None and swept.removed == ("uid-alpha.sleep",) and swept.left == 0
        assert sleep_files(store) == {"uid-beta.sleep"}
        assert not (store / "tenants" / "uid-alpha.sleep").exists()
        assert add(server, beta, 1) == 8  # the kept sleeper wakes in its own state
        assert swept_total() == before + 1
    finally:
        stop(running)


def test_a_tenant_recreated_with_the_same_name_keeps_its_own_snapshot_only(tmp_path: Path) -> None:
    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    put_to_sleep(store, (alpha, 5))
    again = replace(alpha, uid="uid-alpha-2")  # deleted and created again while the shard was down
    running = shard(store, again)
    server = next(running)
    try:
        assert reason(server, "alpha") == LOADED  # never woken in its predecessor's state
        assert add(server, again, 3) == 3
        assert server.run(server.shard.sleep("alpha"))
        swept = server.run(server.shard.sweep_sleep_blobs(grace_s=0))
        assert swept is not None and swept.removed == ("uid-alpha.sleep",)
        assert sleep_files(store) == {"uid-alpha-2.sleep"}
        assert add(server, again, 1) == 4
    finally:
        stop(running)


def test_a_sleeper_whose_tenant_lives_on_elsewhere_keeps_its_snapshot(tmp_path: Path) -> None:
    alpha, beta = counter("alpha", after="1h"), counter("beta", after="1h")
    store = tmp_path / "store"
    put_to_sleep(store, (alpha, 5), (beta, 7))
    running = shard(store)  # neither is assigned here now, but alpha's Tenant exists (moving, moved)
    server = next(running)

    async def live() -> frozenset[str]:
        return frozenset({"uid-alpha"})

    try:
        server.shard.live_uids = live
        swept = server.run(server.shard.sweep_sleep_blobs(grace_s=0))
        assert swept is not None and swept.removed == ("uid-beta.sleep",)
        assert sleep_files(store) == {"uid-alpha.sleep"}
    finally:
        stop(running)
    running = shard(store, alpha)  # and it comes back here: asleep in its own state
    server = next(running)
    try:
        assert reason(server, "alpha") == ASLEEP and add(server, alpha, 1) == 6
    finally:
        stop(running)


def test_a_sweep_is_bounded_and_a_crash_mid_clean_leaves_nothing_a_wake_could_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = [counter(f"t{i}", after="1h") for i in range(5)]
    store = tmp_path / "store"
    put_to_sleep(store, *((cfg, i + 1) for i, cfg in enumerate(configs)))
    running = shard(store)  # all five deleted
    server = next(running)
    try:
        swept = server.run(server.shard.sweep_sleep_blobs(grace_s=0, limit=2))
        assert swept is not None and len(swept.removed) == 2 and swept.left == 3
        assert len(sleep_files(store)) == 3
        # The next one dies removing a blob, after the record went (an I/O error stands in for a
        # crash: the process stops at the same point).
        real_unlink = Path.unlink

        def failing_unlink(self: Path, missing_ok: bool = False) -> None:
            if self.suffix == ".twsnap":
                raise OSError(5, "Input/output error")
            real_unlink(self, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", failing_unlink)
        broken = server.run(server.shard.sweep_sleep_blobs(grace_s=0, limit=1))
        assert broken is not None and broken.removed == () and broken.left == 3
        records = SleepRecords(SnapshotStore(store))
        half = sorted({c.uid + ".sleep" for c in configs} & sleep_files(store))
        assert [records.read(k) for k in half].count(None) == 1  # its record is gone: nothing wakes from it
        monkeypatch.undo()
        rest = server.run(server.shard.sweep_sleep_blobs(grace_s=0))
        assert rest is not None and len(rest.removed) == 3 and rest.left == 0
        assert sleep_files(store) == set() and not list((store / "tenants").glob("*.sleep"))
    finally:
        stop(running)
    revived = configs[0]  # a Tenant of a swept uid coming back loads from its module, fresh
    running = shard(store, revived)
    server = next(running)
    try:
        assert reason(server, revived.name) == LOADED and add(server, revived, 0) == 0
    finally:
        stop(running)


def test_the_grace_time_protects_a_fresh_snapshot(tmp_path: Path) -> None:
    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    put_to_sleep(store, (alpha, 5))
    running = shard(store)
    server = next(running)
    try:
        old = os.stat(store / "sleeping" / "uid-alpha.sleep.json").st_mtime
        kept = server.run(server.shard.sweep_sleep_blobs(now=old + SWEEP_GRACE_S - 1))
        assert kept is not None and kept.removed == () and sleep_files(store) == {"uid-alpha.sleep"}
        gone = server.run(server.shard.sweep_sleep_blobs(now=old + SWEEP_GRACE_S + 60))
        assert gone is not None and gone.removed == ("uid-alpha.sleep",)
    finally:
        stop(running)


K0, K1 = b"0" * 32, b"1" * 32


def test_a_sleeper_signed_with_a_retired_key_is_reported_before_its_wake(tmp_path: Path) -> None:
    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    signing.configure(SigningPolicy("verify-if-present", ring=KeyRing({"k0": K0, "k1": K1}, active="k0")))
    running = shard(store, alpha)
    server = next(running)
    try:
        add(server, alpha, 5)
        assert server.run(server.shard.sleep("alpha"))
        fine = server.run(server.shard.sweep_sleep_blobs(grace_s=0))
        assert fine is not None and fine.stranded == {}
        metrics = server.request("GET", "/metrics").body.decode()
        assert 'tensorwasm_sleep_snapshots{key_id="k0",verifiable="true"} 1.0' in metrics
        # Rotation step 3 done too early: k0 removed while a sleeper still needs it.
        signing.configure(SigningPolicy("verify-if-present", ring=KeyRing({"k1": K1}, active="k1")))
        swept = server.run(server.shard.sweep_sleep_blobs(grace_s=0))
        assert swept is not None and swept.stranded == {"uid-alpha.sleep": "k0"} and swept.removed == ()
        status = server.shard.status("alpha")
        assert status is not None and status.reason == ASLEEP and "no longer lists" in status.message
        metrics = server.request("GET", "/metrics").body.decode()
        assert 'tensorwasm_sleep_snapshots{key_id="k0",verifiable="false"} 1.0' in metrics
        # Listing the key again saves it: the wake verifies and the state is there.
        signing.configure(SigningPolicy("verify-if-present", ring=KeyRing({"k0": K0, "k1": K1}, active="k1")))
        assert server.run(server.shard.sweep_sleep_blobs(grace_s=0)).stranded == {}  # type: ignore[union-attr]
        assert add(server, alpha, 1) == 6
    finally:
        stop(running)
        signing.configure(SigningPolicy())


def test_two_shards_sweeping_one_shared_store_at_once_both_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorwasm.runtime import sleep

    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    put_to_sleep(store, (alpha, 5))
    running = shard(store)
    server = next(running)
    listed = sleep._keys_on_disk

    def listed_then_taken(*args: object) -> dict[str, list[Path]]:
        found = listed(*args)  # type: ignore[arg-type]
        shutil.rmtree(store / "tenants" / "uid-alpha.sleep")  # the other shard got there first
        return found

    try:
        monkeypatch.setattr(sleep, "_keys_on_disk", listed_then_taken)
        swept = server.run(server.shard.sweep_sleep_blobs(grace_s=0))
        assert swept is not None and swept.removed == ("uid-alpha.sleep",) and sleep_files(store) == set()
    finally:
        stop(running)


def test_a_shard_letting_a_sleeper_go_leaves_the_record_another_shard_wrote(tmp_path: Path) -> None:
    """One store for every shard: the tenant moved on and already sleeps on its new shard, under a
    record naming that shard's blob; the old shard, letting it go, removes only its own blob."""
    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    running = shard(store, alpha)
    server = next(running)
    try:
        add(server, alpha, 5)
        assert server.run(server.shard.sleep("alpha"))
        sleeper = server.shard.served["alpha"].sleeper
        assert sleeper is not None
        ours = sleeper.digest
        records = SleepRecords(SnapshotStore(store))
        theirs = replace(records.read(sleeper.key), digest="f" * 32)  # type: ignore[type-var]
        records.write(sleeper.key, theirs)  # the new shard's sleep (its blob under its own digest)
        server.sync([])  # alpha leaves this shard
        assert records.read(sleeper.key) == theirs
        assert not (store / "tenants" / sleeper.key / f"{ours}.twsnap").exists()
    finally:
        stop(running)


def live(*uids: str) -> Callable[[], Awaitable[frozenset[str]]]:
    """A namespace's Tenant uids, as the Kubernetes source lists them."""

    async def listed() -> frozenset[str]:
        return frozenset(uids)

    return listed


def test_a_store_shared_by_two_namespaces_keeps_the_other_releases_sleepers(tmp_path: Path) -> None:
    """Review R2 G14: two releases (namespaces ns-a, ns-b) whose snapshot claims point at one export.
    Each shard lists only its own namespace's Tenants; before, ns-a's sweep took every ns-b key for
    an orphan (no ns-a Tenant has its uid) and deleted ns-b's sleeping tenants."""
    alpha, gone = (
        replace(counter("alpha", after="1h"), namespace="ns-a"),
        replace(counter("gone", after="1h"), namespace="ns-a"),
    )
    beta = replace(counter("beta", after="1h"), namespace="ns-b")
    store = tmp_path / "store"
    put_to_sleep(store, (alpha, 5), (gone, 3), namespace="ns-a")
    put_to_sleep(store, (beta, 7), namespace="ns-b")
    records = SleepRecords(SnapshotStore(store))
    assert set(records.claimed("ns-a")) == {"uid-alpha.sleep", "uid-gone.sleep"}
    assert set(records.claimed("ns-b")) == {"uid-beta.sleep"}
    running = shard(store, alpha, namespace="ns-a")  # gone was deleted; beta lives in ns-b
    server = next(running)
    try:
        server.shard.live_uids = live("uid-alpha")
        swept = server.run(server.shard.sweep_sleep_blobs(grace_s=0))
        assert swept is not None and swept.removed == ("uid-gone.sleep",) and swept.unowned == 1
        assert sleep_files(store) == {"uid-alpha.sleep", "uid-beta.sleep"}
        assert set(records.claimed("ns-a")) == {"uid-alpha.sleep"}  # the deleted key's claim went last
        assert add(server, alpha, 1) == 6
    finally:
        stop(running)
    running = shard(store, beta, namespace="ns-b")
    server = next(running)
    try:
        server.shard.live_uids = live("uid-beta")
        swept = server.run(server.shard.sweep_sleep_blobs(grace_s=0))
        assert swept is not None and swept.removed == () and swept.unowned == 1  # alpha: ns-a's
        assert add(server, beta, 1) == 8  # ns-b's sleeper woke in its own state
    finally:
        stop(running)


def test_keys_written_before_claims_are_adopted_when_live_and_never_swept_otherwise(tmp_path: Path) -> None:
    """A store from before keys were filed by namespace: a key of a live Tenant of this namespace is
    filed on the next sweep (then judged as usual); any other unfiled key might be another
    release's, so it is left alone and counted, never deleted."""
    alpha, gone = counter("alpha", after="1h"), counter("gone", after="1h")
    store = tmp_path / "store"
    put_to_sleep(store, (alpha, 5), (gone, 3))
    shutil.rmtree(store / CLAIMS_DIR)  # as an older version left it
    running = shard(store)
    server = next(running)
    try:
        server.shard.live_uids = live("uid-alpha")
        swept = server.run(server.shard.sweep_sleep_blobs(grace_s=0))
        assert swept is not None and swept.removed == () and swept.unowned == 1
        assert sleep_files(store) == {"uid-alpha.sleep", "uid-gone.sleep"}
        assert set(SleepRecords(SnapshotStore(store)).claimed("")) == {"uid-alpha.sleep"}
        server.shard.live_uids = live()  # alpha deleted too: its key is filed now, so it goes
        swept = server.run(server.shard.sweep_sleep_blobs(grace_s=0))
        assert swept is not None and swept.removed == ("uid-alpha.sleep",)
        assert sleep_files(store) == {"uid-gone.sleep"}
    finally:
        stop(running)


def test_a_blob_nothing_names_in_a_kept_key_goes_after_the_stray_grace(tmp_path: Path) -> None:
    """Review R2 G11: a stale record in the store is ignored (removed) when its tenant moves here with
    a Snapshot; its blob stayed for the tenant's whole life (the sweep kept every file of a live key).
    Now a blob of a kept key that no record names, no sleeper here holds and that is not the key's
    newest goes once older than the stray grace time."""
    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    put_to_sleep(store, (alpha, 9))  # the stale record and its blob (a crash's leftover)
    blobs = store / "tenants" / "uid-alpha.sleep"
    (stale,) = blobs.glob("*.twsnap")
    moving = start_runtime_server([alpha], sleep_store=SnapshotStore(store), moving_in=lambda c: True)
    server = next(moving)
    try:
        assert reason(server, "alpha") == LOADED  # from the move's Snapshot: the record was ignored
        assert add(server, alpha, 1) == 1
        assert server.run(server.shard.sleep("alpha"))  # its own blob now, named by its record
        sleeper = server.shard.served["alpha"].sleeper
        assert sleeper is not None and stale.exists() and len(list(blobs.glob("*.twsnap"))) == 2
        hour_ago = time.time() - 3600
        os.utime(stale, (hour_ago, hour_ago))
        young = server.run(server.shard.sweep_sleep_blobs())  # an hour: within the stray grace (2 h)
        assert young is not None and young.strays == () and stale.exists()
        swept = server.run(server.shard.sweep_sleep_blobs(stray_grace_s=600))
        assert swept is not None and swept.strays == (f"uid-alpha.sleep/{stale.stem}",)
        assert [p.name for p in blobs.glob("*.twsnap")] == [f"{sleeper.digest}.twsnap"]
        assert add(server, alpha, 1) == 2  # it wakes from the blob its record names
    finally:
        stop(moving)


def test_the_newest_blob_and_a_held_one_are_never_strays(tmp_path: Path) -> None:
    """An awake sleeper holds the blob it woke from (its record is gone): on another shard it is the
    key's newest blob, on this one a held digest. Neither is removed, however old."""
    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    running = shard(store, alpha)
    server = next(running)
    try:
        add(server, alpha, 4)
        assert server.run(server.shard.sleep("alpha"))
        sleeper = server.shard.served["alpha"].sleeper
        assert sleeper is not None
        held = store / "tenants" / sleeper.key / f"{sleeper.digest}.twsnap"
        older = held.with_name("0" * 32 + ".twsnap")  # a stray, older than the held blob
        shutil.copyfile(held, older)
        os.utime(older, (time.time() - 7200, time.time() - 7200))
        newer = held.with_name("f" * 32 + ".twsnap")  # a newer unnamed one (another shard's wake)
        shutil.copyfile(held, newer)
        assert add(server, alpha, 1) == 5  # awake: the record is gone, the blob held
        assert SleepRecords(SnapshotStore(store)).read(sleeper.key) is None
        swept = server.run(server.shard.sweep_sleep_blobs(stray_grace_s=0))
        assert swept is not None and swept.strays == (f"uid-alpha.sleep/{'0' * 32}",)
        assert held.exists() and newer.exists()
    finally:
        stop(running)


def test_a_key_ages_by_its_files_not_by_its_claim(tmp_path: Path) -> None:
    """The claim is written once, before the first capture: a key with files ages by their mtimes (a
    snapshot left an hour ago is due although its claim is fresh); a claim alone by its own."""
    alpha = counter("alpha", after="1h")
    store = tmp_path / "store"
    put_to_sleep(store, (alpha, 5))
    hour_ago = time.time() - 3600
    for path in [*(store / "sleeping").rglob("*"), *(store / "tenants").rglob("*")]:
        os.utime(path, (hour_ago, hour_ago))
    lone = store / CLAIMS_DIR / "_local" / "uid-never-slept.sleep"
    lone.touch()  # claimed just before a first capture that has not written anything yet
    running = shard(store)
    server = next(running)
    try:
        swept = server.run(server.shard.sweep_sleep_blobs())
        assert swept is not None and swept.removed == ("uid-alpha.sleep",) and sleep_files(store) == set()
        assert lone.exists()  # within the grace time: the capture may be under way
        later = server.run(server.shard.sweep_sleep_blobs(now=time.time() + SWEEP_GRACE_S + 60))
        assert later is not None and later.removed == () and not lone.exists()
    finally:
        stop(running)
