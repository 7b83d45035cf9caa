"""Snapshot blobs for the fuzzers: valid seeds and `reseal`, which rewrites a blob's manifest and
recomputes its root checksum (what an attacker with write access to the store can do), so that the
fuzzers reach the manifest checks instead of stopping at the checksum."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from tensorwasm.runtime.snapshots import codec

CORPUS = Path(__file__).resolve().parent / "corpus"
UID = "4f7c1e2a-0000-4000-8000-000000000001"
MODULE = "ab" * 32
KEY_ID, KEY = "fuzz-key", bytes(range(64, 96))  # the signed seed's key


def seed_blob(kind: str = "small") -> bytes:
    """Deterministic valid blobs: wasm memory (compressible), globals and, for 'gpu' and 'signed', two
    buffers ('signed': signed with KEY)."""
    memory = bytes(range(256)) * 256 * 2  # 2 pages, compresses well: zstd chunks
    gpu = {1: bytes(4096), 7: bytes(range(256)) * 40} if kind in ("gpu", "signed") else {}
    blob, _ = codec.encode_blob(
        tenant_uid=UID,
        module_sha256=MODULE,
        generation=3,
        memory=memory,
        globals_=[("__tw_global_0", "i32", 1024), ("g", "f64", 1.5)],
        gpu=gpu,
        chunk_size=64 << 10,
        created_at="2026-11-29T22:00:00.000000Z",
        tenant="alpha",
        signer=(KEY_ID, KEY) if kind == "signed" else None,
    )
    return blob


def manifest_of(blob: bytes) -> dict[str, Any]:
    m_off, m_len = struct.unpack_from("<QQ", blob, 16)
    loaded: dict[str, Any] = json.loads(blob[m_off : m_off + m_len])
    return loaded


def reseal(blob: bytes, manifest: Any) -> bytes:
    """`blob` with its manifest replaced by `manifest` (any JSON value) and a valid root."""
    m_off = struct.unpack_from("<Q", blob, 16)[0]
    body = json.dumps(manifest, separators=(",", ":")).encode()
    head = bytearray(blob[:48])
    struct.pack_into("<QQQ", head, 16, m_off, len(body), m_off + len(body))
    root = hashlib.blake2b(bytes(head) + body, digest_size=16).digest()
    return bytes(head) + root + blob[64:m_off] + body


def corpus() -> list[bytes]:
    return [p.read_bytes() for p in sorted(CORPUS.glob("*.twsnap"))]


def crashes() -> list[bytes]:
    return [p.read_bytes() for p in sorted(CORPUS.glob("crash-*.twsnap"))]
