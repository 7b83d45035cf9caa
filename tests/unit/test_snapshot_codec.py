"""Snapshot format v2 (v1 still read): exact round trips, chunk encodings, refusals, golden blobs."""

from __future__ import annotations

import hashlib
import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from tensorwasm.runtime.errors import SnapshotRejected
from tensorwasm.runtime.snapshots import codec

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "snapshots"
MODULE = "ab" * 32


@dataclass
class State:
    memory: bytes
    globals_: list[codec.GlobalValue]
    gpu: dict[int, bytes]


def random_bytes(rng: random.Random, n: int) -> bytes:
    """Mixed contents: random runs (weights), zero runs, and repeated patterns."""
    out = bytearray()
    while len(out) < n:
        kind, run = rng.randrange(3), rng.randint(1, 96 << 10)
        if kind == 0:
            out += rng.randbytes(run)
        elif kind == 1:
            out += bytes(run)
        else:
            out += bytes([rng.randrange(256)]) * run
    return bytes(out[:n])


def random_globals(rng: random.Random) -> list[codec.GlobalValue]:
    specials = [0.0, -0.0, float("inf"), float("-inf"), 1e-310, 3.4028234663852886e38]
    out: list[codec.GlobalValue] = []
    for i in range(rng.randint(0, 6)):
        t = rng.choice(["i32", "i64", "f32", "f64"])
        if t == "i32":
            out.append((f"g{i}", t, rng.randint(-(2**31), 2**31 - 1)))
        elif t == "i64":
            out.append((f"g{i}", t, rng.randint(-(2**63), 2**63 - 1)))
        else:
            out.append((f"g{i}", t, rng.choice([*specials, rng.uniform(-1e9, 1e9)])))
    return out


def random_state(rng: random.Random, max_memory_pages: int = 8, max_gpu: int = 300_000) -> State:
    memory = random_bytes(rng, 65536 * rng.randint(0, max_memory_pages))
    gpu = {
        rng.randint(1, 1 << 40): random_bytes(rng, rng.randint(0, max_gpu)) for _ in range(rng.randint(0, 4))
    }
    return State(memory, random_globals(rng), gpu)


def encode(state: State, chunk_size: int = 64 << 10, **kw: object) -> tuple[bytes, str]:
    args: dict[str, object] = {"tenant_uid": "uid-1", "module_sha256": MODULE, "generation": 1, **kw}
    return codec.encode_blob(
        memory=state.memory,
        globals_=state.globals_,
        gpu=state.gpu,
        chunk_size=chunk_size,
        **args,  # type: ignore[arg-type]
    )


def decode(blob: bytes) -> State:
    m = codec.verify_all(blob).manifest
    memory = bytes(codec.decode_region(blob, m, m.region("wasm_memory")))
    globals_ = codec.decode_globals(codec.decode_region(blob, m, m.region("globals")))
    gpu = {r.handle: bytes(codec.decode_region(blob, m, r)) for r in codec.iter_gpu_regions(m) if r.handle}
    return State(memory, globals_, gpu)


def same_globals(a: list[codec.GlobalValue], b: list[codec.GlobalValue]) -> bool:
    """Bit-exact (so -0.0 differs from 0.0)."""
    pack = [(n, t, struct.pack("<d", v) if isinstance(v, float) else v) for n, t, v in a]
    return pack == [(n, t, struct.pack("<d", v) if isinstance(v, float) else v) for n, t, v in b]


@pytest.mark.parametrize("seed", range(40))
def test_random_states_round_trip_bit_exact(seed: int) -> None:
    rng = random.Random(seed)
    state = random_state(rng)
    blob, digest = encode(state, chunk_size=rng.choice([4096, 65536, 1 << 20]))
    back = decode(blob)
    assert back.memory == state.memory
    assert back.gpu == state.gpu
    assert same_globals(back.globals_, state.globals_)
    assert codec.parse(blob).digest == digest


def test_empty_state_round_trips() -> None:
    blob, _ = encode(State(b"", [], {}))
    m = codec.verify_all(blob).manifest
    assert m.raw_bytes == 2  # just "[]" for the globals
    assert decode(blob) == State(b"", [], {})


def test_zero_size_gpu_buffer_keeps_its_handle() -> None:
    back = decode(encode(State(bytes(65536), [], {7: b"", 9: b"x" * 10}))[0])
    assert back.gpu == {7: b"", 9: b"x" * 10}


def test_incompressible_chunks_are_stored_raw_and_zero_chunks_compressed() -> None:
    rng = random.Random(1)
    blob, _ = encode(State(bytes(1 << 20), [], {1: rng.randbytes(1 << 20)}), chunk_size=256 << 10)
    m = codec.parse(blob).manifest
    memory, weights = m.region("wasm_memory"), m.regions[2]
    assert {m.chunks[memory.first_chunk + j].codec for j in range(memory.chunk_count)} == {"zstd"}
    assert {m.chunks[weights.first_chunk + j].codec for j in range(weights.chunk_count)} == {"raw"}
    assert m.stored_bytes < (1 << 20) + (64 << 10)


def test_float32_weights_that_barely_compress_are_stored_raw() -> None:
    np = pytest.importorskip("numpy")
    weights = np.random.default_rng(0).standard_normal(1 << 18).astype(np.float32).tobytes()
    kind, stored = codec.encode_chunk(memoryview(weights))
    assert kind == "raw" and len(stored) == len(weights)


def test_manifest_records_binding_and_regions() -> None:
    blob, _ = encode(
        State(bytes(65536 * 2), [("g", "i32", 1)], {5: b"a" * 100}), generation=7, tenant="alpha"
    )
    m = codec.parse(blob).manifest
    assert (m.tenant_uid, m.tenant, m.module_sha256, m.generation) == ("uid-1", "alpha", MODULE, 7)
    assert [r.kind for r in m.regions] == ["wasm_memory", "globals", "gpu_buffer"]
    assert m.gpu_buffers() == {5: 100}
    assert m.created_at.endswith("Z")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"NOTASNAP" + b[8:], "bad magic"),
        (lambda b: b[:8] + struct.pack("<H", 3) + b[10:], "version 3 is not supported"),
        (lambda b: b[:30], "truncated"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\0", "longer than recorded"),
        (lambda b: b"", "truncated"),
    ],
)
def test_structural_damage_is_refused_with_a_clear_message(mutate: object, message: str) -> None:
    blob, _ = encode(State(bytes(65536), [], {1: b"w" * 1000}))
    with pytest.raises(SnapshotRejected, match=message):
        codec.verify_all(mutate(blob))  # type: ignore[operator]


def _resealed(blob: bytes, edit: object) -> bytes:
    """Rewrite the manifest (and reseal the root) so only the structural checks can catch the edit."""
    p = codec.parse(blob)
    d = p.manifest.to_json()
    edit(d)  # type: ignore[operator]
    m_off = struct.unpack_from("<Q", blob, 16)[0]
    body = json.dumps(d, separators=(",", ":"), sort_keys=True).encode()
    head = struct.pack("<8sHHIQQQQ", codec.MAGIC, 2, 128, 0, m_off, len(body), m_off + len(body), 0)
    root = codec._root(head, body)
    return head + root + blob[64:m_off] + body  # an unsigned v2 blob: bytes 64..127 stay zero


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(tenant_uid=""), "empty tenant uid"),
        (lambda d: d.update(module_sha256="XYZ"), "module_sha256"),
        (lambda d: d["regions"].reverse(), "regions must be"),
        (lambda d: d["regions"][2].update(size=d["regions"][2]["size"] + 1), "region chunk"),
        (lambda d: d["chunks"][0].update(offset=d["chunks"][0]["offset"] + 1), "gap or overlaps"),
        (lambda d: d["regions"][2].update(handle=0), "handle must be an integer"),
        (lambda d: d["chunks"][0].update(codec="lz4"), "codec or checksum malformed"),
        (lambda d: d.update(generation=-1), "generation"),
    ],
)
def test_inconsistent_manifests_are_refused(edit: object, message: str) -> None:
    blob, _ = encode(State(bytes(65536), [], {1: b"w" * 1000}))
    with pytest.raises(SnapshotRejected, match=message):
        codec.parse(_resealed(blob, edit))


def test_resealing_without_edit_is_accepted() -> None:
    """Guards the test above: the reseal helper itself produces valid blobs."""
    blob, _ = encode(State(bytes(65536), [], {1: b"w" * 1000}))
    codec.verify_all(_resealed(blob, lambda d: None))


def test_unsupported_global_types_are_refused_at_capture() -> None:
    with pytest.raises(SnapshotRejected, match="v128"):
        codec.encode_globals([("v", "v128", 0)])
    with pytest.raises(SnapshotRejected, match="non-integer"):
        codec.encode_globals([("g", "i32", 1.5)])


# --- golden blobs: every released version stays readable ------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.twsnap")) or ["missing"])
def test_golden_blobs_stay_readable(name: str) -> None:
    blob = (GOLDEN / f"{name}.twsnap").read_bytes()
    expected = json.loads((GOLDEN / f"{name}.json").read_text())
    parsed = codec.verify_all(blob)
    m = parsed.manifest
    assert parsed.digest == expected["digest"]
    assert (m.tenant_uid, m.module_sha256, m.generation) == (
        expected["tenant_uid"], expected["module_sha256"], expected["generation"],
    )  # fmt: skip
    regions = {}
    for r in m.regions:
        key = r.kind if r.handle is None else f"gpu:{r.handle}"
        regions[key] = hashlib.sha256(codec.decode_region(blob, m, r)).hexdigest()
    assert regions == expected["regions_sha256"]
    assert codec.decode_globals(codec.decode_region(blob, m, m.region("globals"))) == [
        tuple(g) for g in expected["globals"]
    ]


@pytest.mark.parametrize(
    ("total", "expected"),
    [(0, 256 << 10), (1 << 20, 256 << 10), (16 << 20, 1 << 20), (40 << 20, 4 << 20), (512 << 20, 4 << 20)],
)
def test_chunk_size_spreads_small_snapshots_and_caps_at_4_mib(total: int, expected: int) -> None:
    assert codec.choose_chunk_size(total) == expected
