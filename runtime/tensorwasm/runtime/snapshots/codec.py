"""The snapshot blob format v2 (and v1, still read): layout, manifest, chunk encoding, verification
and the signature block (pure, no I/O, no keys).

Owns everything about the bytes of a blob (see docs/snapshot-format.md): the fixed header (64 bytes
in v1; 128 in v2, whose last 64 hold the signature block: key id + HMAC-SHA256), the JSON manifest,
independent zstd-or-raw chunks, checksums. It never opens files, never touches a tenant, never
holds a key ring (signing.py does), and must not import wasmtime, cuda, the engine or the accelerators.

Layout: header | chunks (any order, contiguous) | manifest. The manifest goes last so a capture can
write compressed chunks in parallel as they finish and only then know where everything is.

Checksums: CRC-32 (zlib) per stored chunk, BLAKE2b-128 "root" over header[0:48] + manifest bytes. The
manifest holds every chunk's offset, length and CRC, so the root covers the whole blob (a hash tree
of depth one) and chunks are checked in parallel. Why CRC-32 per chunk: zlib releases the GIL on
large buffers, so it scales with cores (~2.5 GB/s each); the xxhash wheel holds the GIL and stayed
at ~7 GB/s total on the H100 host whatever the thread count (measured), and blake2b runs ~0.8 GB/s.
CRC-32 also detects every burst error up to 32 bits. The root hashes a few KiB, so BLAKE2b costs nothing.
These checksums guard against corruption, not against a forger (CRC-32 is trivially forged). A signed
v2 blob adds a SHA-256 per chunk to the manifest and an HMAC-SHA256 over header[0:96] + manifest,
so the MAC covers every byte; SHA-256 (SHA-NI, GIL released) runs on the same worker threads.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import numpy as np
import zstandard

from tensorwasm.runtime.errors import SnapshotRejected

MAGIC: Final = b"\x89TWSNP\r\n"  # high bit + CRLF catch 7-bit and newline-mangling transfers
VERSION: Final = 2  # what this build writes
READ_VERSIONS: Final = (1, 2)  # what it reads: every released version (golden blobs in tests/fixtures)
HEADER_SIZE: Final = 128  # v2; chunks start here
V1_HEADER_SIZE: Final = 64
FLAG_SIGNED: Final = 1  # header flags bit 0: key id + HMAC-SHA256 in bytes 64..127, SHA-256 per chunk
KEY_ID_BYTES: Final = 32
MAC_BYTES: Final = 32
DEFAULT_CHUNK_SIZE: Final = 4 << 20
MAX_CHUNK_SIZE: Final = 64 << 20
MAX_MANIFEST_BYTES: Final = 64 << 20
MAX_REGIONS: Final = 1 << 16
MAX_GLOBALS_BYTES: Final = 1 << 20  # the globals region is a small JSON list, never a payload
MAX_WASM_MEMORY_BYTES: Final = 4 << 30  # memory32
MAX_GPU_BUFFER_BYTES: Final = 1 << 50
_REGION_KINDS: Final = ("wasm_memory", "globals", "gpu_buffer")
ZSTD_LEVEL: Final = 3
# Store raw unless zstd saves at least 1/8: float32 weights compress ~1.08-1.12x, and decoding them
# (0.57 GB/s per core) costs far more restore time than copying the few bytes saved (>10 GB/s).
MIN_SAVING_FRACTION: Final = 1 / 8
_PROBE_BYTES: Final = 16 << 10
_PROBE_POINTS: Final = 4

_HEADER = struct.Struct(
    "<8sHHIQQQQ16s"
)  # magic, version, header_len, flags, manifest_off/len, file_len, 0, root
_GLOBAL_TYPES: Final = ("i32", "i64", "f32", "f64")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX8 = re.compile(r"^[0-9a-f]{8}$")
KEY_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")

RegionKind = Literal["wasm_memory", "globals", "gpu_buffer"]
ChunkCodec = Literal["raw", "zstd"]
GlobalValue = tuple[str, str, int | float]


@dataclass(frozen=True)
class Chunk:
    """One independently decodable piece of a region, as stored in the blob."""

    offset: int  # absolute byte offset of the stored bytes in the blob
    stored: int  # bytes in the blob
    size: int  # bytes once decoded
    codec: ChunkCodec
    checksum: int  # CRC-32 of the stored bytes
    sha256: bytes | None = None  # of the stored bytes; signed blobs only (the MAC covers it)


@dataclass(frozen=True)
class Region:
    """A contiguous piece of tenant state; chunk j of it decodes to [j*chunk_size, ...)."""

    kind: RegionKind
    size: int
    first_chunk: int
    chunk_count: int
    handle: int | None = None  # GPU buffer handle for kind == "gpu_buffer"


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to check and place a blob's contents."""

    tenant_uid: str
    module_sha256: str
    generation: int
    created_at: str
    chunk_size: int
    regions: tuple[Region, ...]
    chunks: tuple[Chunk, ...]
    tenant: str = ""
    version: int = VERSION

    @property
    def signed(self) -> bool:
        return bool(self.chunks) and all(c.sha256 is not None for c in self.chunks)

    def region(self, kind: RegionKind) -> Region:
        return next(r for r in self.regions if r.kind == kind)

    def gpu_buffers(self) -> dict[int, int]:
        """GPU handle -> size, in blob order."""
        return {r.handle: r.size for r in self.regions if r.kind == "gpu_buffer" and r.handle is not None}

    @property
    def raw_bytes(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def stored_bytes(self) -> int:
        return sum(c.stored for c in self.chunks)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "tensorwasm-snapshot",
            "version": self.version,
            "tenant_uid": self.tenant_uid,
            "tenant": self.tenant,
            "module_sha256": self.module_sha256,
            "generation": self.generation,
            "created_at": self.created_at,
            "chunk_size": self.chunk_size,
            "compression": {"codec": "zstd", "level": ZSTD_LEVEL},
            "checksum": "crc32",
            "regions": [_region_json(r) for r in self.regions],
            "chunks": [_chunk_json(c) for c in self.chunks],
        }


@dataclass(frozen=True)
class Signature:
    """A signed blob's signature block, and the bytes its MAC covers (header[0:96] + manifest)."""

    key_id: str
    mac: bytes
    message: bytes


@dataclass(frozen=True)
class Parsed:
    """A blob whose header, root digest and manifest structure checked out (chunks not yet; the
    signature, if any, is checked by signing.SigningPolicy.check against a key ring)."""

    manifest: Manifest
    digest: str  # hex BLAKE2b-128 root: the blob's content address
    file_length: int
    signature: Signature | None = None  # None: unsigned (every v1 blob, unsigned v2 blobs)

    @property
    def version(self) -> int:
        return self.manifest.version


# A signer: (key id, key). Pure: the caller (signing.py) chose the key.
Signer = tuple[str, bytes]


@dataclass
class RegionData:
    """Host bytes of one region to encode (capture side)."""

    kind: RegionKind
    data: memoryview
    handle: int | None = None
    chunks: list[Chunk] = field(default_factory=list)


def _chunk_json(c: Chunk) -> dict[str, Any]:
    out: dict[str, Any] = {
        "offset": c.offset,
        "stored": c.stored,
        "size": c.size,
        "codec": c.codec,
        "crc32": f"{c.checksum:08x}",
    }
    if c.sha256 is not None:
        out["sha256"] = c.sha256.hex()
    return out


def _region_json(r: Region) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": r.kind, "size": r.size, "chunks": [r.first_chunk, r.chunk_count]}
    if r.handle is not None:
        out["handle"] = r.handle
    return out


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- globals -------------------------------------------------------------------------------------


def encode_globals(values: Sequence[GlobalValue]) -> bytes:
    """Canonical JSON; floats as float.hex() so every value (inf, -0.0) round-trips exactly."""
    rows: list[list[Any]] = []
    for name, valtype, value in values:
        if valtype not in _GLOBAL_TYPES:
            raise SnapshotRejected(
                f"global {name!r} has type {valtype!r}; snapshots hold only {_GLOBAL_TYPES}"
            )
        if valtype.startswith("i"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise SnapshotRejected(f"global {name!r} of type {valtype} holds a non-integer {value!r}")
            rows.append([name, valtype, value])
        else:
            rows.append([name, valtype, float(value).hex()])
    return json.dumps(rows, separators=(",", ":")).encode()


def decode_globals(data: bytes | bytearray | memoryview) -> list[GlobalValue]:
    try:
        rows = json.loads(bytes(data))
        out: list[GlobalValue] = []
        for name, valtype, value in rows:
            if not isinstance(name, str) or valtype not in _GLOBAL_TYPES:
                raise ValueError(f"bad global row {[name, valtype]!r}")
            if valtype.startswith("i"):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"global {name!r} is not an integer")
                out.append((name, valtype, value))
            else:
                out.append((name, valtype, float.fromhex(value)))
        return out
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise SnapshotRejected(f"snapshot globals region is malformed: {exc}") from exc


# --- chunk encoding ------------------------------------------------------------------------------


MIN_CHUNK_SIZE: Final = 256 << 10
TARGET_CHUNKS: Final = 16


def choose_chunk_size(total_bytes: int) -> int:
    """A power of two in [256 KiB, 4 MiB] giving about 16 chunks, so small snapshots also spread
    their checksum/decode work over every core while large ones keep 4 MiB chunks."""
    size = MIN_CHUNK_SIZE
    while size < DEFAULT_CHUNK_SIZE and size * TARGET_CHUNKS < total_bytes:
        size *= 2
    return size


def split(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, length) of each chunk of a region of `size` bytes; empty regions have none."""
    return [(s, min(chunk_size, size - s)) for s in range(0, size, chunk_size)]


def _worth_compressing(data: memoryview, cctx: zstandard.ZstdCompressor) -> bool:
    """Compress a few spread samples first: incompressible chunks then cost ~1/16 of a full try."""
    n = len(data)
    if n <= _PROBE_BYTES * _PROBE_POINTS:
        return True
    step = (n - _PROBE_BYTES) // (_PROBE_POINTS - 1)
    sampled = saved = 0
    for i in range(_PROBE_POINTS):
        sample = data[i * step : i * step + _PROBE_BYTES]
        sampled += len(sample)
        saved += len(sample) - len(cctx.compress(sample))
    return saved >= sampled * MIN_SAVING_FRACTION


def encode_chunk(
    data: memoryview, cctx: zstandard.ZstdCompressor | None = None
) -> tuple[ChunkCodec, bytes | memoryview]:
    """zstd level 3 when it saves at least MIN_SAVING_FRACTION, else the bytes as they are."""
    cctx = cctx or zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    if len(data) and _worth_compressing(data, cctx):
        packed = cctx.compress(data)
        if len(packed) <= len(data) * (1 - MIN_SAVING_FRACTION):
            return "zstd", packed
    return "raw", data


def checksum(data: bytes | memoryview) -> int:
    return zlib.crc32(data)


def strong_checksum(data: bytes | memoryview) -> bytes:
    """SHA-256 of a signed blob's stored chunk (hashlib releases the GIL on large buffers)."""
    return hashlib.sha256(data).digest()


def stored_chunk(offset: int, data: memoryview, codec_: ChunkCodec, stored: bytes | memoryview,
                 *, signed: bool) -> Chunk:  # fmt: skip
    """The chunk-table row of `stored` (the encoding of `data`) written at `offset`."""
    sha = strong_checksum(stored) if signed else None
    return Chunk(offset, len(stored), len(data), codec_, checksum(stored), sha)


def decode_chunk_into(blob: memoryview, chunk: Chunk, out: memoryview) -> None:
    """Decode one verified chunk of `blob` straight into `out` (len == chunk.size)."""
    decode_stored_into(blob[chunk.offset : chunk.offset + chunk.stored], chunk, out)


_tls = threading.local()


def _dctx() -> zstandard.ZstdDecompressor:
    """One decompressor per thread: creating one allocates its context (~100 KiB) every chunk."""
    d: zstandard.ZstdDecompressor | None = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = zstandard.ZstdDecompressor()
    return d


def decode_stored_into(stored: memoryview, chunk: Chunk, out: memoryview) -> None:
    """Decode a chunk's verified stored bytes into `out`; no intermediate buffer."""
    if chunk.codec == "raw":
        # numpy's copy releases the GIL (a memoryview slice assignment does not), so raw chunks
        # copy in parallel on the worker threads.
        np.copyto(np.frombuffer(out, dtype=np.uint8), np.frombuffer(stored, dtype=np.uint8))
        return
    # stream_reader.readinto decompresses into our buffer (GIL released); decompress() would
    # allocate and page-fault a fresh buffer per chunk, ~7x slower measured here.
    try:
        with _dctx().stream_reader(stored, read_across_frames=False) as reader:
            filled = 0
            while filled < chunk.size:
                got = reader.readinto(out[filled:])
                if got == 0:
                    break
                filled += got
            extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise SnapshotRejected(f"chunk at offset {chunk.offset} does not decompress: {exc}") from exc
    if filled != chunk.size or extra:
        raise SnapshotRejected(
            f"chunk at offset {chunk.offset} decompresses to the wrong size (expected {chunk.size} bytes)"
        )


# --- header, manifest, root ----------------------------------------------------------------------


def _root(header_head: bytes, manifest_bytes: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(header_head)
    h.update(manifest_bytes)
    return h.digest()


def build_manifest(
    *,
    tenant_uid: str,
    module_sha256: str,
    generation: int,
    regions: Sequence[RegionData],
    chunk_size: int,
    created_at: str | None = None,
    tenant: str = "",
) -> Manifest:
    """Number the chunks region by region (each region's `chunks` already filled, in order)."""
    table: list[Chunk] = []
    out_regions: list[Region] = []
    for r in regions:
        out_regions.append(Region(r.kind, len(r.data), len(table), len(r.chunks), r.handle))
        table.extend(r.chunks)
    manifest = Manifest(
        tenant_uid=tenant_uid,
        module_sha256=module_sha256,
        generation=generation,
        created_at=created_at or now_rfc3339(),
        chunk_size=chunk_size,
        regions=tuple(out_regions),
        chunks=tuple(table),
        tenant=tenant,
    )
    _check_manifest(manifest, chunks_end=max((c.offset + c.stored for c in table), default=HEADER_SIZE))
    return manifest


def seal(manifest: Manifest, manifest_offset: int, signer: Signer | None = None) -> tuple[bytes, bytes, str]:
    """(header, manifest bytes, digest) for a v2 manifest written at `manifest_offset`; signed with
    `signer` (key id, key), whose chunks must then all carry their SHA-256."""
    if signer is not None and manifest.chunks and not manifest.signed:
        raise ValueError("a signed snapshot needs the SHA-256 of every chunk")
    if signer is None and any(c.sha256 is not None for c in manifest.chunks):
        raise ValueError("an unsigned snapshot carries no chunk SHA-256")
    body = json.dumps(manifest.to_json(), separators=(",", ":"), sort_keys=True).encode()
    file_length = manifest_offset + len(body)
    flags = FLAG_SIGNED if signer is not None else 0
    head = _HEADER.pack(MAGIC, VERSION, HEADER_SIZE, flags, manifest_offset, len(body), file_length, 0, b"")
    root = _root(head[:48], body)
    if signer is None:
        return head[:48] + root + bytes(HEADER_SIZE - 64), body, root.hex()
    key_id, key = signer
    if not KEY_ID_PATTERN.match(key_id):
        raise ValueError(f"key id {key_id!r} must match {KEY_ID_PATTERN.pattern}")
    signed = head[:48] + root + key_id.encode().ljust(KEY_ID_BYTES, b"\0")
    mac = hmac.new(key, signed + body, hashlib.sha256).digest()
    return signed + mac, body, root.hex()


def encode_blob(
    *,
    tenant_uid: str,
    module_sha256: str,
    generation: int,
    memory: bytes | bytearray | memoryview,
    globals_: Sequence[GlobalValue],
    gpu: Mapping[int, bytes | bytearray | memoryview],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    created_at: str | None = None,
    tenant: str = "",
    signer: Signer | None = None,
) -> tuple[bytes, str]:
    """Serial, in-memory encoder (fixtures, tests, small tenants): (blob, digest)."""
    regions = plan_regions(memory, globals_, gpu)
    parts: list[bytes | memoryview] = []
    offset = HEADER_SIZE
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    for region in regions:
        for start, length in split(len(region.data), chunk_size):
            data = region.data[start : start + length]
            codec, stored = encode_chunk(data, cctx)
            region.chunks.append(stored_chunk(offset, data, codec, stored, signed=signer is not None))
            parts.append(stored)
            offset += len(stored)
    manifest = build_manifest(
        tenant_uid=tenant_uid,
        module_sha256=module_sha256,
        generation=generation,
        regions=regions,
        chunk_size=chunk_size,
        created_at=created_at,
        tenant=tenant,
    )
    header, body, digest = seal(manifest, offset, signer)
    return b"".join([header, *parts, body]), digest


def plan_regions(
    memory: bytes | bytearray | memoryview,
    globals_: Sequence[GlobalValue],
    gpu: Mapping[int, bytes | bytearray | memoryview],
) -> list[RegionData]:
    """Regions in blob order: wasm memory, globals, then GPU buffers by ascending handle."""
    regions = [
        RegionData("wasm_memory", memoryview(memory).cast("B")),
        RegionData("globals", memoryview(encode_globals(globals_))),
    ]
    for handle in sorted(gpu):
        regions.append(RegionData("gpu_buffer", memoryview(gpu[handle]).cast("B"), handle=handle))
    return regions


# --- reading -------------------------------------------------------------------------------------


def parse(blob: bytes | memoryview) -> Parsed:
    """Check header, root digest and manifest structure; chunk payloads are checked by verify_chunk."""
    view = memoryview(blob)
    return parse_parts(lambda offset, n: bytes(view[offset : offset + n]), len(view))


def parse_parts(read: Callable[[int, int], bytes], n: int) -> Parsed:
    """`parse` over a reader (offset, length) -> bytes: touches only the header and the manifest."""
    if n < V1_HEADER_SIZE:
        raise SnapshotRejected(
            f"snapshot is truncated: {n} bytes, shorter than the {V1_HEADER_SIZE}-byte header"
        )
    head = read(0, V1_HEADER_SIZE)
    magic, version, header_len, flags, m_off, m_len, file_len, reserved, root = _HEADER.unpack_from(head, 0)
    if magic != MAGIC:
        raise SnapshotRejected("not a TensorWasm snapshot (bad magic)")
    if version not in READ_VERSIONS:
        raise SnapshotRejected(
            f"snapshot format version {version} is not supported (this build reads versions "
            f"{', '.join(map(str, READ_VERSIONS))})"
        )
    want_len, allowed_flags = (V1_HEADER_SIZE, 0) if version == 1 else (HEADER_SIZE, FLAG_SIGNED)
    if header_len != want_len or flags & ~allowed_flags or reserved != 0:
        raise SnapshotRejected(
            "snapshot header is corrupt (unexpected header length, flags or reserved bits)"
        )
    signed = bool(flags & FLAG_SIGNED)
    if n < header_len:
        what = "signed " if signed else ""
        raise SnapshotRejected(
            f"{what}snapshot is truncated: {n} bytes, shorter than its {header_len}-byte header"
        )
    if header_len > V1_HEADER_SIZE:
        head = read(0, header_len)
    if file_len != n:
        what = "truncated" if n < file_len else "longer than recorded"
        kind = "signed snapshot" if signed else "snapshot"
        raise SnapshotRejected(f"{kind} is {what}: {n} bytes, header says {file_len}")
    if m_len > MAX_MANIFEST_BYTES or m_off < header_len or m_off + m_len != n:
        raise SnapshotRejected("snapshot header is corrupt (manifest location out of range)")
    body = read(m_off, m_len)
    if len(body) != m_len or _root(head[:48], body) != root:
        raise SnapshotRejected("snapshot manifest or header is corrupt (root checksum mismatch)")
    signature = _signature(head, body) if signed else None
    if not signed and any(head[V1_HEADER_SIZE:header_len]):
        raise SnapshotRejected("snapshot header is corrupt (an unsigned blob has a signature block)")
    try:
        manifest = _manifest_from_json(json.loads(body), version)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as exc:
        # Any shape the JSON may take is a refusal, never a traceback (tests/fuzz holds us to it).
        raise SnapshotRejected(f"snapshot manifest is malformed: {type(exc).__name__}: {exc}") from exc
    if manifest.chunks and manifest.signed != signed:
        raise SnapshotRejected(
            "snapshot manifest is inconsistent: the header's signed flag and the chunks' SHA-256 disagree"
        )
    _check_manifest(manifest, chunks_end=m_off, start=header_len)
    return Parsed(manifest, root.hex(), n, signature)


def _signature(head: bytes, body: bytes) -> Signature:
    raw_id = head[V1_HEADER_SIZE : V1_HEADER_SIZE + KEY_ID_BYTES]
    key_id = raw_id.rstrip(b"\0")
    try:
        text = key_id.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if not KEY_ID_PATTERN.match(text) or any(raw_id[len(key_id) :]):
        raise SnapshotRejected("signed snapshot header is corrupt (the key id is not a valid key name)")
    mac = head[V1_HEADER_SIZE + KEY_ID_BYTES : V1_HEADER_SIZE + KEY_ID_BYTES + MAC_BYTES]
    return Signature(text, bytes(mac), bytes(head[: V1_HEADER_SIZE + KEY_ID_BYTES]) + bytes(body))


def mac_matches(signature: Signature, key: bytes) -> bool:
    """Constant-time check of a signature's HMAC-SHA256 under `key`."""
    return hmac.compare_digest(hmac.new(key, signature.message, hashlib.sha256).digest(), signature.mac)


def check_stored(stored: bytes | memoryview, manifest: Manifest, index: int) -> None:
    """The stored bytes of chunk `index` match its checksum (and length)."""
    c = manifest.chunks[index]
    # Signed blobs: SHA-256 (what the MAC vouches for) instead of the CRC, which a forger can match.
    if len(stored) != c.stored or (
        strong_checksum(stored) != c.sha256 if c.sha256 is not None else checksum(stored) != c.checksum
    ):
        raise SnapshotRejected(
            f"snapshot chunk {index} ({_region_of(manifest, index)}) is corrupt (checksum mismatch)",
            chunk=index,
        )


def verify_chunk(blob: memoryview, manifest: Manifest, index: int) -> None:
    c = manifest.chunks[index]
    check_stored(blob[c.offset : c.offset + c.stored], manifest, index)


def verify_all(blob: bytes | memoryview) -> Parsed:
    """Full serial verification (inspect, store listing of small blobs); restore verifies in parallel."""
    parsed = parse(blob)
    view = memoryview(blob)
    for i in range(len(parsed.manifest.chunks)):
        verify_chunk(view, parsed.manifest, i)
    return parsed


def check_decodes(blob: bytes | memoryview, manifest: Manifest) -> None:
    """Decode every chunk (into one reused scratch buffer) and parse the globals: what `inspect`
    must do before calling a blob intact, since a chunk can match its checksum and still not be
    valid zstd of the declared size."""
    view = memoryview(blob)
    scratch = memoryview(bytearray(manifest.chunk_size))
    for i, c in enumerate(manifest.chunks):
        try:
            decode_chunk_into(view, c, scratch[: c.size])
        except SnapshotRejected as exc:
            raise SnapshotRejected(f"snapshot chunk {i} ({_region_of(manifest, i)}): {exc.message}") from exc
    decode_globals(decode_region(view, manifest, manifest.region("globals")))


def decode_region(blob: bytes | memoryview, manifest: Manifest, region: Region) -> bytearray:
    """Decode one region serially (tests, inspect, globals); the restore pipeline does this in parallel."""
    view = memoryview(blob)
    out = bytearray(region.size)
    target = memoryview(out)
    for j in range(region.chunk_count):
        c = manifest.chunks[region.first_chunk + j]
        start = j * manifest.chunk_size
        decode_chunk_into(view, c, target[start : start + c.size])
    return out


def _region_of(manifest: Manifest, index: int) -> str:
    for r in manifest.regions:
        if r.first_chunk <= index < r.first_chunk + r.chunk_count:
            return r.kind if r.handle is None else f"gpu buffer {r.handle}"
    return "no region"


def _int(v: Any, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _list_of_dicts(v: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise ValueError(f"{what} must be a list of objects")
    return v


def _manifest_from_json(d: Any, version: int = VERSION) -> Manifest:
    if not isinstance(d, dict):
        raise ValueError("the manifest is not a JSON object")
    if d.get("format") != "tensorwasm-snapshot" or d.get("version") != version:
        raise ValueError("format/version fields do not match the header")
    if d.get("checksum") != "crc32" or d.get("compression") != {"codec": "zstd", "level": ZSTD_LEVEL}:
        raise ValueError("unknown checksum or compression")
    regions = []
    for r in _list_of_dicts(d["regions"], "regions"):
        if r.get("kind") not in _REGION_KINDS:
            raise ValueError(f"unknown region kind {r.get('kind')!r}")
        span = r["chunks"]
        if not isinstance(span, list) or len(span) != 2:
            raise ValueError("region chunks must be [first, count]")
        first, count = span
        handle = r.get("handle")
        regions.append(
            Region(
                kind=r["kind"],
                size=_int(r["size"], "region size"),
                first_chunk=_int(first, "first chunk"),
                chunk_count=_int(count, "chunk count"),
                handle=None if handle is None else _int(handle, "handle", 1),
            )
        )
    chunks = []
    for c in _list_of_dicts(d["chunks"], "chunks"):
        if (
            c["codec"] not in ("raw", "zstd")
            or not isinstance(c["crc32"], str)
            or not _HEX8.match(c["crc32"])
        ):
            raise ValueError("chunk codec or checksum malformed")
        sha = c.get("sha256")
        if sha is not None and (version < 2 or not isinstance(sha, str) or not _HEX64.match(sha)):
            raise ValueError("chunk sha256 malformed")
        chunks.append(
            Chunk(
                offset=_int(c["offset"], "chunk offset"),
                stored=_int(c["stored"], "chunk stored size"),
                size=_int(c["size"], "chunk size", 1, MAX_CHUNK_SIZE),
                codec=c["codec"],
                checksum=int(c["crc32"], 16),
                sha256=None if sha is None else bytes.fromhex(sha),
            )
        )
    for key in ("tenant_uid", "tenant", "module_sha256", "created_at"):
        if not isinstance(d[key], str):
            raise ValueError(f"{key} must be a string")
    return Manifest(
        tenant_uid=d["tenant_uid"],
        tenant=d["tenant"],
        module_sha256=d["module_sha256"],
        generation=_int(d["generation"], "generation"),
        created_at=d["created_at"],
        chunk_size=_int(d["chunk_size"], "chunk_size", 1, MAX_CHUNK_SIZE),
        regions=tuple(regions),
        chunks=tuple(chunks),
        version=version,
    )


def _check_manifest(m: Manifest, *, chunks_end: int, start: int = HEADER_SIZE) -> None:
    """Structural invariants; any violation means a corrupt or hostile blob."""

    def bad(why: str) -> SnapshotRejected:
        return SnapshotRejected(f"snapshot manifest is inconsistent: {why}")

    if not m.tenant_uid:
        raise bad("empty tenant uid")
    if not _HEX64.match(m.module_sha256):
        raise bad("module_sha256 is not 64 lowercase hex digits")
    if len(m.regions) > MAX_REGIONS:
        raise bad(f"{len(m.regions)} regions, more than {MAX_REGIONS}")
    kinds = [r.kind for r in m.regions]
    if kinds[:2] != ["wasm_memory", "globals"] or any(k != "gpu_buffer" for k in kinds[2:]):
        raise bad(f"regions must be wasm_memory, globals, then gpu_buffer: got {kinds[:4]}...")
    handles = [r.handle for r in m.regions[2:]]
    if any(h is None for h in handles) or len(set(handles)) != len(handles):
        raise bad("GPU buffer handles missing or repeated")
    if any(r.handle is not None for r in m.regions[:2]):
        raise bad("only GPU buffers carry handles")
    # Every declared size is bounded here, before any reader allocates for it (restore stages
    # whole regions; the tenant's own caps are checked next, in restore.check_binding).
    bound = {
        "wasm_memory": MAX_WASM_MEMORY_BYTES,
        "globals": MAX_GLOBALS_BYTES,
        "gpu_buffer": MAX_GPU_BUFFER_BYTES,
    }
    for r in m.regions:
        if r.size > bound[r.kind]:
            raise bad(f"{r.kind} region declares {r.size} bytes, more than {bound[r.kind]}")
    expected_first = 0
    for r in m.regions:
        if r.first_chunk != expected_first or r.chunk_count != math.ceil(r.size / m.chunk_size):
            raise bad(f"{r.kind} region chunk range does not match its size")
        if r.first_chunk + r.chunk_count > len(m.chunks):
            raise bad(f"{r.kind} region names chunks past the end of the chunk table")
        for j in range(r.chunk_count):
            want = min(m.chunk_size, r.size - j * m.chunk_size)
            if m.chunks[r.first_chunk + j].size != want:
                raise bad(f"{r.kind} region chunk {j} has the wrong decoded size")
        expected_first += r.chunk_count
    if expected_first != len(m.chunks):
        raise bad("chunk table has chunks that belong to no region")
    if any(c.sha256 is not None for c in m.chunks) and not m.signed:
        raise bad("some chunks carry a SHA-256 and some do not")
    # Chunks must tile [header end, chunks_end) exactly: no gaps, overlaps or unchecked bytes.
    cursor = start
    for c in sorted(m.chunks, key=lambda c: c.offset):
        if c.offset != cursor or c.stored == 0:
            raise bad(f"chunk at offset {c.offset} leaves a gap or overlaps (expected {cursor})")
        if c.codec == "raw" and c.stored != c.size:
            raise bad(f"raw chunk at offset {c.offset} has stored size {c.stored} != {c.size}")
        cursor += c.stored
    if cursor != chunks_end:
        raise bad(f"chunks end at {cursor}, manifest starts at {chunks_end}")


def iter_gpu_regions(m: Manifest) -> Iterable[Region]:
    return (r for r in m.regions if r.kind == "gpu_buffer")
