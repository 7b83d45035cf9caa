"""Writes tests/fuzz/corpus: the seeds plus one blob per crash the readers had (issue 13), each
resealed with a valid root checksum. Run `python -m tests.fuzz.make_corpus` after a format change;
the files are committed so the fuzzers and the regression tests start from them."""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable
from typing import Any

from tests.fuzz.blobs import CORPUS, manifest_of, reseal, seed_blob


def _edit(blob: bytes, change: Callable[[dict[str, Any]], Any]) -> bytes:
    doc = copy.deepcopy(manifest_of(blob))
    out = change(doc)
    return reseal(blob, doc if out is None else out)


def _globals_huge(doc: dict[str, Any]) -> None:
    doc["regions"][1]["size"] = 1536 << 20  # 1.5 GiB of "globals" from a blob of a few KiB


def _chunk_range_past_table(doc: dict[str, Any]) -> None:
    doc["regions"][0]["chunks"] = [0, 10_000]
    doc["regions"][0]["size"] = 10_000 * doc["chunk_size"]


def _region_not_object(doc: dict[str, Any]) -> None:
    doc["regions"][0] = ["wasm_memory", 1]


def _undecodable_zstd(blob: bytes) -> bytes:
    """A zstd chunk whose stored bytes are garbage with a matching CRC: checksums pass, decode fails."""
    doc = manifest_of(blob)
    c = next(c for c in doc["chunks"] if c["codec"] == "zstd")
    junk = (bytes(range(7, 256)) * (c["stored"] // 249 + 1))[: c["stored"]]
    out = bytearray(blob)
    out[c["offset"] : c["offset"] + c["stored"]] = junk
    c["crc32"] = f"{zlib.crc32(junk):08x}"
    return reseal(bytes(out), doc)


CASES: dict[str, Callable[[bytes], bytes]] = {
    "seed-small": lambda b: b,
    "crash-manifest-is-a-list": lambda b: reseal(b, []),
    "crash-region-is-not-an-object": lambda b: _edit(b, _region_not_object),
    "crash-chunk-range-past-table": lambda b: _edit(b, _chunk_range_past_table),
    "crash-globals-declares-1.5GiB": lambda b: _edit(b, _globals_huge),
    "crash-zstd-chunk-passes-crc-but-does-not-decode": _undecodable_zstd,
}


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    (CORPUS / "seed-gpu.twsnap").write_bytes(seed_blob("gpu"))
    for name, make in CASES.items():
        (CORPUS / f"{name}.twsnap").write_bytes(make(seed_blob("small")))


if __name__ == "__main__":
    main()
