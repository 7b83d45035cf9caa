"""Signed snapshots (format v2): the key ring, the three modes, forged/unsigned/unknown-key/truncated
blobs refused with their reason before the tenant changes, key rotation, golden signed blobs, inspect."""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

import pytest

from tensorwasm.cli.main import main as cli_main
from tensorwasm.runtime.accel.cpu import CpuAccelerator
from tensorwasm.runtime.engine import CompiledModule, Engine
from tensorwasm.runtime.errors import SnapshotRejected
from tensorwasm.runtime.settings import SettingsError, load_settings
from tensorwasm.runtime.snapshots import codec, signing
from tensorwasm.runtime.snapshots.capture import capture_snapshot
from tensorwasm.runtime.snapshots.restore import restore_snapshot
from tensorwasm.runtime.snapshots.signing import KeyRing, KeyRingError, SigningPolicy
from tensorwasm.runtime.snapshots.store import SnapshotStore
from tests.unit.test_snapshot_restore import UID, make_tenant, randomize, snapshot_of

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "snapshots"
K1, K2 = bytes(range(100, 132)), bytes(range(1, 33))
RING = KeyRing({"k1": K1}, "k1")


def blob(signer: codec.Signer | None = ("k1", K1), gpu_bytes: int = 100_000) -> bytes:
    rng = random.Random(7)
    out, _ = codec.encode_blob(
        tenant_uid="uid-1", module_sha256="ab" * 32, generation=1, memory=bytes(65536),
        globals_=[("g", "i32", 3)], gpu={1: rng.randbytes(gpu_bytes)}, chunk_size=64 << 10, signer=signer,
    )  # fmt: skip
    return out


def judge(data: bytes, mode: signing.Mode, ring: KeyRing = RING) -> str:
    parsed = codec.verify_all(data)
    return SigningPolicy(mode, ring=ring).check(parsed)


# --- the verdict matrix -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "mode", "verdict"),
    [
        ("signed", "require", "signed with key 'k1', verified"),
        ("signed", "verify-if-present", "signed with key 'k1', verified"),
        ("signed", "off", "not verified: signing is off"),
        ("unsigned", "require", "Unsigned"),
        ("unsigned", "verify-if-present", "unsigned"),
        ("unsigned", "off", "unsigned"),
        ("v1", "require", "Unsigned"),
        ("v1", "verify-if-present", "unsigned"),
        ("unknown_key", "require", "UnknownKey"),
        ("unknown_key", "verify-if-present", "UnknownKey"),
        ("wrong_key", "require", "BadSignature"),
        ("wrong_key", "verify-if-present", "BadSignature"),
    ],
)
def test_each_mode_accepts_or_refuses_each_kind_of_blob(kind: str, mode: signing.Mode, verdict: str) -> None:
    data = {
        "signed": lambda: blob(),
        "unsigned": lambda: blob(None),
        "v1": lambda: (GOLDEN / "v1-mixed.twsnap").read_bytes(),
        "unknown_key": lambda: blob(("k9", K1)),
        "wrong_key": lambda: blob(("k1", K2)),  # same id, another key: a forger's guess
    }[kind]()
    if verdict[0].isupper():
        with pytest.raises(SnapshotRejected) as refused:
            judge(data, mode)
        assert refused.value.details["reason"] == verdict
        assert refused.value.status == 422 and refused.value.to_json()["error"]["kind"] == "snapshot_rejected"
    else:
        assert verdict in judge(data, mode)


def test_a_resealed_manifest_keeps_a_valid_root_but_fails_the_signature() -> None:
    """What someone with write access to the volume can do: edit the manifest, recompute the root."""
    data = bytearray(blob())
    m_off, m_len = struct.unpack_from("<QQ", data, 16)
    doc = json.loads(data[m_off : m_off + m_len])
    doc["generation"] = 99
    body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    head = bytearray(data[:48])
    struct.pack_into("<QQQ", head, 16, m_off, len(body), m_off + len(body))
    forged = bytes(head) + codec._root(bytes(head), body) + bytes(data[64:m_off]) + body
    assert codec.verify_all(forged).manifest.generation == 99  # every checksum passes
    with pytest.raises(SnapshotRejected, match="signature does not match key 'k1'"):
        judge(forged, "verify-if-present")


def _forge_same_crc(stored: bytes, at: int) -> bytes:
    """`stored` with byte 0 changed and 4 bytes at `at` chosen so the CRC-32 is unchanged (CRC is linear)."""
    n = len(stored)

    def delta(change: dict[int, int]) -> int:
        buf = bytearray(n)
        for i, v in change.items():
            buf[i] ^= v
        return zlib.crc32(bytes(buf)) ^ zlib.crc32(bytes(n))

    target = delta({0: 0xFF})
    basis = [(delta({at + b // 8: 1 << (b % 8)}), 1 << b) for b in range(32)]
    rows: list[tuple[int, int]] = []  # Gaussian elimination over GF(2)
    for vec, mask in basis:
        for rv, rm in rows:
            if vec ^ rv < vec:
                vec, mask = vec ^ rv, mask ^ rm
        if vec:
            rows.append((vec, mask))
    choice = 0
    for rv, rm in sorted(rows, reverse=True):
        if target ^ rv < target:
            target, choice = target ^ rv, choice ^ rm
    assert target == 0
    out = bytearray(stored)
    out[0] ^= 0xFF
    for b in range(4):
        out[at + b] ^= (choice >> (8 * b)) & 0xFF
    assert zlib.crc32(bytes(out)) == zlib.crc32(stored) and bytes(out) != stored
    return bytes(out)


@pytest.mark.parametrize("signed", [True, False])
def test_a_chunk_forged_to_keep_its_crc_is_refused_only_when_signed(signed: bool) -> None:
    """Why signed blobs carry a SHA-256 per chunk: a CRC-32 is matched in microseconds."""
    data = bytearray(blob(("k1", K1) if signed else None))
    parsed = codec.parse(bytes(data))
    raw = next(c for c in parsed.manifest.chunks if c.codec == "raw" and c.stored > 1000)  # GPU weights
    data[raw.offset : raw.offset + raw.stored] = _forge_same_crc(
        bytes(data[raw.offset : raw.offset + raw.stored]), 100
    )
    if signed:
        with pytest.raises(SnapshotRejected, match="is corrupt"):
            codec.verify_all(bytes(data))
    else:
        codec.verify_all(bytes(data))  # the CRC alone cannot tell: unsigned blobs guard against accidents


def test_every_truncation_of_a_signed_blob_is_refused_as_truncated() -> None:
    data = blob(gpu_bytes=3000)
    for cut in [*range(0, 200), *range(len(data) - 300, len(data))]:
        with pytest.raises(SnapshotRejected, match="truncated"):
            codec.verify_all(data[:cut])


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (64, b"\xff", "key id is not a valid key name"),
        (64 + 6, b"x", "key id is not a valid key name"),  # a byte after the NUL padding starts
        (12, b"\x02", "flags"),
        (12, b"\x00", "unsigned blob has a signature block"),  # the signed flag cleared
    ],
)
def test_a_damaged_signature_block_is_refused(offset: int, value: bytes, message: str) -> None:
    data = bytearray(blob(("k1234", K1)))
    data[offset : offset + len(value)] = value
    with pytest.raises(SnapshotRejected, match=message):
        judge(rerooted(data), "verify-if-present")


def rerooted(data: bytearray) -> bytes:
    """Recompute the root over the edited header: the edit must be caught by more than the checksum."""
    m_off, m_len = struct.unpack_from("<QQ", data, 16)
    data[48:64] = codec._root(bytes(data[:48]), bytes(data[m_off : m_off + m_len]))
    return bytes(data)


def test_a_signature_stripped_off_is_refused_while_the_manifest_still_has_chunk_hashes() -> None:
    data = bytearray(blob())
    data[12] = 0
    data[64:128] = bytes(64)
    with pytest.raises(SnapshotRejected, match="signed flag and the chunks' SHA-256 disagree"):
        codec.verify_all(rerooted(data))


def test_an_unsigned_v2_blob_with_bytes_in_its_signature_block_is_refused() -> None:
    data = bytearray(blob(None))
    data[100] = 1
    with pytest.raises(SnapshotRejected, match="unsigned blob has a signature block"):
        codec.verify_all(bytes(data))


# --- golden blobs ---------------------------------------------------------------------------------


def test_the_golden_signed_blob_verifies_with_its_key_and_only_with_it() -> None:
    expected = json.loads((GOLDEN / "v2-signed.json").read_text())
    data = (GOLDEN / "v2-signed.twsnap").read_bytes()
    ring = KeyRing({expected["key_id"]: bytes.fromhex(expected["key_hex"])})
    assert judge(data, "require", ring) == f"signed with key {expected['key_id']!r}, verified"
    with pytest.raises(SnapshotRejected, match="not in this shard's key ring"):
        judge(data, "require", RING)


@pytest.mark.parametrize("name", ["v1-mixed", "v1-empty", "v2-mixed", "v2-empty"])
def test_golden_unsigned_blobs_are_refused_by_require_and_read_otherwise(name: str) -> None:
    data = (GOLDEN / f"{name}.twsnap").read_bytes()
    assert codec.verify_all(data).version == int(name[1])
    assert judge(data, "verify-if-present") == "unsigned"
    with pytest.raises(SnapshotRejected, match=rf"unsigned \(format v{name[1]}\)"):
        judge(data, "require")


# --- key ring -------------------------------------------------------------------------------------


def secret_volume(root: Path, entries: dict[str, bytes]) -> Path:
    """The layout kubelet writes for a Secret volume: entries are symlinks into ..data."""
    data = root / "..2026_11_30_00_00_00.000000001"
    data.mkdir(parents=True)
    for name, value in entries.items():
        (data / name).write_bytes(value)
    (root / "..data").symlink_to(data.name)
    for name in entries:
        (root / name).symlink_to(f"..data/{name}")
    return root


def test_a_mounted_secret_is_a_key_ring(tmp_path: Path) -> None:
    ring = KeyRing.from_dir(secret_volume(tmp_path, {"k1": K1, "k2": K2, "active": b"k2\n"}))
    assert ring.keys == {"k1": K1, "k2": K2} and ring.active == "k2"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"k1": b"short", "active": b"k1"}, "is 5 bytes; use 32"),
        ({"k1": K1, "active": b"k2"}, "active signing key 'k2' is not in the ring"),
        ({"bad id!": K1}, "must match"),
    ],
)
def test_a_bad_key_ring_is_refused_with_what_to_fix(
    tmp_path: Path, entries: dict[str, bytes], message: str
) -> None:
    with pytest.raises(KeyRingError, match=message):
        KeyRing.from_dir(secret_volume(tmp_path, entries))


def test_require_without_an_active_key_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(KeyRingError, match="require needs an active key"):
        signing.configure(SigningPolicy("require", secret_volume(tmp_path, {"k1": K1})))
    with pytest.raises(KeyRingError, match="cannot be read"):
        signing.configure(SigningPolicy("verify-if-present", tmp_path / "missing"))
    assert signing.current().mode == "off"  # a refused policy is not installed


def test_the_mode_flag_is_validated() -> None:
    with pytest.raises(SettingsError, match="--snapshot-signing: expected one of require"):
        load_settings(["--tenants-file", str(GOLDEN / "v1-empty.json"), "--snapshot-signing", "maybe"])
    s = load_settings(
        ["--tenants-file", str(GOLDEN / "v1-empty.json")],
        {"TENSORWASM_RUNTIME_SNAPSHOT_SIGNING": "require", "TENSORWASM_RUNTIME_SNAPSHOT_SIGNING_KEYS": "/k"},
    )
    assert (s.snapshot_signing, s.snapshot_signing_keys) == ("require", Path("/k"))


# --- through capture and restore on the real engine -----------------------------------------------


@pytest.fixture(scope="module")
def module(stateful_module: CompiledModule) -> CompiledModule:
    return stateful_module  # tests/conftest.py


@pytest.fixture
def accel() -> CpuAccelerator:
    a = CpuAccelerator()
    yield a  # type: ignore[misc]
    a.close()


def test_rotation_signs_with_the_active_key_and_verifies_with_any_listed(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    keys = secret_volume(tmp_path / "keys", {"k1": K1, "active": b"k1"})
    policy = SigningPolicy("require", keys)
    store = SnapshotStore(tmp_path / "store")
    src = make_tenant(engine, module, accel, "src")
    randomize(src, random.Random(1))
    before = snapshot_of(src)
    old = capture_snapshot(store, tenant_uid=UID, module_sha256=module.sha256, generation=1, pool=src.pool,
                           device=src.device, signing_policy=policy).path  # fmt: skip
    # Rotate in place, as `kubectl apply` of the Secret does: add k2, make it active.
    (keys / "..2026_11_30_00_00_00.000000001" / "k2").write_bytes(K2)
    (keys / "k2").symlink_to("..data/k2")
    (keys / "..2026_11_30_00_00_00.000000001" / "active").write_bytes(b"k2")
    new = capture_snapshot(store, tenant_uid=UID, module_sha256=module.sha256, generation=2, pool=src.pool,
                           device=src.device, signing_policy=policy).path  # fmt: skip
    assert [codec.parse(p.read_bytes()).signature.key_id for p in (old, new)] == ["k1", "k2"]  # type: ignore[union-attr]
    for path in (old, new):
        dst = make_tenant(engine, module, accel, f"dst-{path.name[:6]}")
        result = restore_snapshot(path, tenant_uid=UID, module_sha256=module.sha256, pool=dst.pool,
                                  device=dst.device, signing_policy=policy, hot=None)  # fmt: skip
        assert "verified" in result.signature and snapshot_of(dst) == before
    # k1 retired: its blobs are refused by name, the tenant keeps what it had.
    (keys / "k1").unlink()
    dst = make_tenant(engine, module, accel, "dst-retired")
    randomize(dst, random.Random(2))
    kept = snapshot_of(dst)
    with pytest.raises(SnapshotRejected, match="key id 'k1', which is not in this shard's key ring"):
        restore_snapshot(old, tenant_uid=UID, module_sha256=module.sha256, pool=dst.pool, device=dst.device,
                         signing_policy=policy, hot=None)  # fmt: skip
    assert snapshot_of(dst) == kept


def test_require_refuses_an_unsigned_capture_and_the_tenant_is_untouched(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    store = SnapshotStore(tmp_path)
    src = make_tenant(engine, module, accel, "src")
    randomize(src, random.Random(3))
    path = capture_snapshot(store, tenant_uid=UID, module_sha256=module.sha256, generation=1, pool=src.pool,
                            device=src.device, signing_policy=SigningPolicy("off")).path  # fmt: skip
    dst = make_tenant(engine, module, accel, "dst")
    randomize(dst, random.Random(4))
    kept = snapshot_of(dst)
    with pytest.raises(SnapshotRejected, match="requires signed snapshots"):
        restore_snapshot(path, tenant_uid=UID, module_sha256=module.sha256, pool=dst.pool, device=dst.device,
                         signing_policy=SigningPolicy("require", ring=RING), hot=None)  # fmt: skip
    assert snapshot_of(dst) == kept


def test_a_blob_renamed_over_another_digest_is_refused(
    engine: Engine, module: CompiledModule, accel: CpuAccelerator, tmp_path: Path
) -> None:
    """Rollback by rename: the Snapshot resource names a digest, the file must carry it."""
    store = SnapshotStore(tmp_path)
    src = make_tenant(engine, module, accel, "src")
    first = capture_snapshot(store, tenant_uid=UID, module_sha256=module.sha256, generation=1, pool=src.pool,
                             device=src.device, signing_policy=SigningPolicy(ring=RING)).path  # fmt: skip
    randomize(src, random.Random(5))
    policy = SigningPolicy(ring=RING)
    second = capture_snapshot(store, tenant_uid=UID, module_sha256=module.sha256, generation=2,
                              pool=src.pool, device=src.device, signing_policy=policy).path  # fmt: skip
    second.write_bytes(first.read_bytes())
    dst = make_tenant(engine, module, accel, "dst")
    with pytest.raises(SnapshotRejected, match=f"holds the blob with digest {first.stem}, not {second.stem}"):
        restore_snapshot(second, tenant_uid=UID, module_sha256=module.sha256, pool=dst.pool,
                         device=dst.device, signing_policy=policy, hot=None)  # fmt: skip


# --- tensorwasm snapshot inspect -------------------------------------------------------------------


def test_inspect_shows_the_signature_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = json.loads((GOLDEN / "v2-signed.json").read_text())
    keys = secret_volume(tmp_path / "keys", {expected["key_id"]: bytes.fromhex(expected["key_hex"])})
    signed = str(GOLDEN / "v2-signed.twsnap")
    assert cli_main(["snapshot", "inspect", signed]) == 0
    assert (
        "signature    signed with key 'golden-2026' (not verified: no --signing-keys given)"
        in capsys.readouterr().out
    )
    assert cli_main(["snapshot", "inspect", signed, "--signing-keys", str(keys)]) == 0
    assert "signature    signed with key 'golden-2026', verified" in capsys.readouterr().out
    assert cli_main(["snapshot", "inspect", str(GOLDEN / "v1-mixed.twsnap")]) == 0
    out = capsys.readouterr().out
    assert "(format v1," in out and "signature    unsigned" in out
    other = secret_volume(tmp_path / "other", {"k1": K1})
    assert cli_main(["snapshot", "inspect", signed, "--signing-keys", str(other)]) == 1
    assert "not in this shard's key ring" in capsys.readouterr().err
    assert cli_main(["snapshot", "inspect", signed, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["signature"] == {"key_id": "golden-2026", "state": "not verified"} and doc["version"] == 2
