"""`tensorwasm snapshot inspect`: prints the manifest of a good blob, refuses a damaged one loudly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tensorwasm.cli.main import main

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "snapshots" / "v1-mixed.twsnap"


def test_inspect_prints_the_manifest_of_a_good_blob(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snapshot", "inspect", str(GOLDEN)]) == 0
    out = capsys.readouterr().out
    assert "7f7b0f2db44a3ef543397d286cc42b68" in out
    assert "verified: header, manifest and 12 chunks" in out
    assert "gpu_buffer 2" in out and "generation   3" in out


def test_inspect_json_is_the_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snapshot", "inspect", "--json", str(GOLDEN)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == 1 and doc["tenant"] == "golden" and len(doc["chunks"]) == 12


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_inspect_refuses_a_damaged_blob(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray(GOLDEN.read_bytes())
    if damage == "flip":
        data[200_000] ^= 0x40  # inside a GPU buffer chunk
    else:
        data = data[:-10]
    bad = tmp_path / "bad.twsnap"
    bad.write_bytes(bytes(data))
    assert main(["snapshot", "inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "is not a valid snapshot" in err
    assert ("checksum mismatch" if damage == "flip" else "truncated") in err


def test_inspect_of_a_missing_file_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snapshot", "inspect", str(tmp_path / "nope.twsnap")]) == 2
    assert "cannot read" in capsys.readouterr().err
