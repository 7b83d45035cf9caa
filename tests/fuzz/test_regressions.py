"""Every crash the readers had becomes a test: each crafted blob in tests/fuzz/corpus (valid root
checksum, hostile manifest or chunk) is refused with SnapshotRejected, and `tensorwasm snapshot
inspect` says why with exit code 1, never a traceback or a false "verified"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tensorwasm.runtime.errors import SnapshotRejected
from tensorwasm.runtime.snapshots import codec
from tensorwasm.runtime.snapshots.store import SnapshotStore
from tests.fuzz.blobs import CORPUS, UID

CRASHES = sorted(CORPUS.glob("crash-*.twsnap"))
WHY = {
    "crash-manifest-is-a-list": "not a JSON object",
    "crash-region-is-not-an-object": "regions must be a list of objects",
    "crash-chunk-range-past-table": "past the end of the chunk table",
    "crash-globals-declares-1.5GiB": "globals region declares 1610612736 bytes",
    "crash-zstd-chunk-passes-crc-but-does-not-decode": "does not decompress",
}


def test_every_crash_has_a_reason() -> None:
    assert {p.stem for p in CRASHES} == set(WHY)


@pytest.mark.parametrize("path", CRASHES, ids=lambda p: p.stem)
def test_a_crafted_blob_is_refused_with_its_reason(path: Path) -> None:
    blob = path.read_bytes()
    with pytest.raises(SnapshotRejected, match=WHY[path.stem].replace(".", r"\.")):
        parsed = codec.verify_all(blob)
        codec.check_decodes(blob, parsed.manifest)


@pytest.mark.parametrize("path", CRASHES, ids=lambda p: p.stem)
def test_inspect_refuses_it_with_exit_1(path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tensorwasm.cli.main", "snapshot", "inspect", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "is not a valid snapshot" in proc.stderr and "Traceback" not in proc.stderr


def test_the_store_skips_and_reports_unreadable_blobs(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    good = (CORPUS / "seed-small.twsnap").read_bytes()
    digest = codec.parse(good).digest
    store.put_bytes(UID, good, digest)
    directory = store.tenant_dir(UID)
    for i, path in enumerate(CRASHES):
        (directory / f"{i:032x}.twsnap").write_bytes(path.read_bytes())
    (tmp_path / "tenants" / "not a uid!").mkdir()
    assert [s.digest for s in store.list(UID)] == [digest]
    latest = store.latest(UID)
    assert latest is not None and latest.digest == digest
    store.gc()  # no raise: bad blobs and foreign directories are skipped
    assert len(store.unreadable()) >= len(CRASHES) - 1  # the undecodable chunk is only found on restore
