"""Snapshot store: atomic content-addressed writes, listing order, retention, GC, refusals."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tensorwasm.runtime.errors import BadRequest, NotFound, SnapshotRejected
from tensorwasm.runtime.snapshots import codec
from tensorwasm.runtime.snapshots.capture import write_snapshot
from tensorwasm.runtime.snapshots.store import SnapshotStore, read_manifest

MODULE = "cd" * 32


def put(store: SnapshotStore, uid: str, generation: int, payload: bytes = b"x") -> str:
    blob, digest = codec.encode_blob(
        tenant_uid=uid, module_sha256=MODULE, generation=generation, memory=bytes(65536),
        globals_=[("g", "i32", generation)], gpu={1: payload * 1000},
    )  # fmt: skip
    store.put_bytes(uid, blob, digest)
    return digest


def test_blob_is_stored_under_its_digest_and_reads_back(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    digest = put(store, "u1", 1)
    path = store.path_of("u1", digest)
    assert path == tmp_path / "tenants" / "u1" / f"{digest}.twsnap"
    assert read_manifest(path).digest == digest
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_latest_is_the_highest_generation(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, retain=10)
    digests = {g: put(store, "u1", g, bytes([g])) for g in (2, 5, 3)}
    latest = store.latest("u1")
    assert latest is not None and latest.digest == digests[5] and latest.manifest.generation == 5
    assert [s.manifest.generation for s in store.list("u1")] == [5, 3, 2]
    assert store.latest("other") is None


def test_gc_keeps_the_newest_per_tenant_and_pinned_digests(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, retain=2)
    a = [put(store, "a", g, bytes([g])) for g in range(5)]
    b = [put(store, "b", g, bytes([g])) for g in range(2)]
    removed = store.gc(keep=frozenset({a[0]}))
    assert sorted(p.name for p in removed) == sorted(f"{d}.twsnap" for d in a[1:3])
    assert {s.digest for s in store.list("a")} == {a[0], a[3], a[4]}
    assert {s.digest for s in store.list("b")} == set(b)


def test_abandoned_temp_files_are_invisible_and_collected(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, temp_grace_s=3600)
    good = put(store, "u1", 1)
    directory = store.tenant_dir("u1")
    dead = directory / ".tmp-999999999-abc"  # a pid that cannot exist
    dead.write_bytes(b"half a blob")
    mine = store.begin("u1")  # a live writer in this process: must survive gc
    assert [s.digest for s in store.list("u1")] == [good]
    removed = store.gc()
    assert removed == [dead]
    assert mine.temp_path.exists()
    mine.close()
    assert not mine.temp_path.exists()


def test_old_temp_files_are_collected_even_if_the_pid_was_reused(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, temp_grace_s=10)
    directory = store.tenant_dir("u1")
    directory.mkdir(parents=True)
    stale = directory / f".tmp-{os.getpid()}-old"
    stale.write_bytes(b"x")
    past = time.time() - 60
    os.utime(stale, (past, past))
    assert store.gc() == [stale]


def test_corrupt_blobs_are_not_listed(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    good = put(store, "u1", 1)
    bad = put(store, "u1", 2)
    path = store.path_of("u1", bad)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the manifest
    path.write_bytes(bytes(data))
    assert [s.digest for s in store.list("u1")] == [good]


def test_a_blob_under_another_tenants_directory_is_not_listed(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    digest = put(store, "u1", 1)
    other = store.tenant_dir("u2")
    other.mkdir(parents=True)
    store.path_of("u1", digest).rename(other / f"{digest}.twsnap")
    assert store.list("u2") == []


def test_commit_refuses_a_digest_the_header_does_not_carry(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    blob, _ = codec.encode_blob(
        tenant_uid="u1", module_sha256=MODULE, generation=1, memory=b"", globals_=[], gpu={}
    )
    with pytest.raises(SnapshotRejected, match="does not carry its digest"):
        store.put_bytes("u1", blob, "0" * 32)
    assert list(store.tenant_dir("u1").iterdir()) == []


def test_bad_names_are_refused(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    for uid in ("", "..", "a/b", "../../etc"):
        with pytest.raises(BadRequest, match="tenant uid"):
            store.tenant_dir(uid)
    with pytest.raises(BadRequest, match="digest"):
        store.path_of("u1", "../x")
    with pytest.raises(NotFound, match="not in the store"):
        store.path_of("u1", "0" * 32)
    with pytest.raises(BadRequest, match="at least 1"):
        SnapshotStore(tmp_path, retain=0)


def test_delete_removes_the_blob(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    digest = put(store, "u1", 1)
    assert store.delete("u1", digest) is True
    assert store.delete("u1", digest) is False
    assert store.list("u1") == []


def test_parallel_writer_produces_a_verifiable_blob(tmp_path: Path) -> None:
    rng = __import__("random").Random(5)
    gpu = {3: rng.randbytes(3 << 20), 4: bytes(2 << 20), 5: b""}
    memory = bytes(65536 * 40)
    result = write_snapshot(
        SnapshotStore(tmp_path), tenant_uid="u1", module_sha256=MODULE, generation=9, memory=memory,
        globals_=[("g", "f64", 2.5)], gpu=gpu, chunk_size=1 << 20,
    )  # fmt: skip
    blob = result.path.read_bytes()
    parsed = codec.verify_all(blob)
    assert parsed.digest == result.digest and parsed.manifest.generation == 9
    m = parsed.manifest
    assert bytes(codec.decode_region(blob, m, m.region("wasm_memory"))) == memory
    for r in codec.iter_gpu_regions(m):
        assert r.handle is not None and bytes(codec.decode_region(blob, m, r)) == gpu[r.handle]
    assert set(result.timings) >= {"encode", "commit", "total"}
