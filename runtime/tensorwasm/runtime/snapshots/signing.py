"""Snapshot signing: the key ring (a mounted Kubernetes Secret), the mode, and the verdict on a blob.

Owns `KeyRing` (HMAC keys by key id, plus which one signs), `SigningPolicy` (require /
verify-if-present / off, with the ring's directory) and the process's policy `POLICY`, set once at
shard start from the settings (like snapshots.hot_tier.HOT_TIERS). The bytes (header signature
block, MAC input, per-chunk SHA-256) are codec.py's; this module only picks keys and judges.

Rotation: the Secret holds one entry per key (`<key id>`: at least 32 random bytes) and `active`
(the key id that signs). The ring is re-read from the mounted directory on every capture and
restore (a few small files; kubelet swaps a Secret volume atomically), so adding a key, moving
`active` to it, and later removing the old key needs no restart: a shard verifies with any listed
key and signs with the active one.
Must not import wasmtime, cuda, the engine or the accelerators; stdlib and codec only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from tensorwasm.runtime.errors import SnapshotRejected
from tensorwasm.runtime.settings import SNAPSHOT_SIGNING_MODES
from tensorwasm.runtime.snapshots import codec

Mode = Literal["require", "verify-if-present", "off"]
MODES: Final = SNAPSHOT_SIGNING_MODES  # one list: the settings validate flags against it
ACTIVE_ENTRY: Final = "active"  # the Secret entry naming the signing key's id
MIN_KEY_BYTES: Final = 32  # HMAC-SHA256 keys shorter than its output weaken it
MAX_KEY_BYTES: Final = 4096
MAX_KEYS: Final = 64

# Refusal reasons (Snapshot status / error details), CamelCase like the binding ones in restore.py.
UNSIGNED, BAD_SIGNATURE, UNKNOWN_KEY = "Unsigned", "BadSignature", "UnknownKey"


class KeyRingError(ValueError):
    """The key directory cannot be used: the message names the entry and what is wrong with it."""


@dataclass(frozen=True)
class KeyRing:
    """HMAC keys by id and the id that signs new snapshots (None: this ring only verifies)."""

    keys: Mapping[str, bytes] = field(default_factory=dict)
    active: str | None = None

    def __post_init__(self) -> None:
        if len(self.keys) > MAX_KEYS:
            raise KeyRingError(f"{len(self.keys)} signing keys, more than {MAX_KEYS}")
        for key_id, key in self.keys.items():
            if not codec.KEY_ID_PATTERN.match(key_id) or key_id == ACTIVE_ENTRY:
                raise KeyRingError(
                    f"signing key id {key_id!r} must match {codec.KEY_ID_PATTERN.pattern} and not be "
                    f"{ACTIVE_ENTRY!r}"
                )
            if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
                raise KeyRingError(
                    f"signing key {key_id!r} is {len(key)} bytes; use {MIN_KEY_BYTES} to {MAX_KEY_BYTES} "
                    "random bytes (e.g. head -c 32 /dev/urandom)"
                )
        if self.active is not None and self.active not in self.keys:
            listed = ", ".join(sorted(self.keys)) or "none"
            raise KeyRingError(f"active signing key {self.active!r} is not in the ring (keys: {listed})")

    @classmethod
    def from_dir(cls, path: Path) -> KeyRing:
        """Read a mounted Secret: every regular entry but `active` is a key; `active` names the signer.

        Kubernetes mounts entries as symlinks into a `..data` directory; dot entries are its plumbing."""
        try:
            entries = sorted(e for e in os.listdir(path) if not e.startswith("."))
        except OSError as exc:
            why = exc.strerror or exc
            raise KeyRingError(f"signing key directory {path} cannot be read: {why}") from None
        keys: dict[str, bytes] = {}
        active: str | None = None
        if len(entries) > MAX_KEYS + 1:
            raise KeyRingError(f"signing key directory {path} has {len(entries)} entries, over {MAX_KEYS}")
        for name in entries:
            entry = path / name
            if not entry.is_file():
                continue
            try:
                data = entry.read_bytes()[: MAX_KEY_BYTES + 1]
            except OSError as exc:
                raise KeyRingError(f"signing key {entry} cannot be read: {exc.strerror or exc}") from None
            if name == ACTIVE_ENTRY:
                active = data.decode("ascii", "replace").strip() or None
            else:
                keys[name] = data
        return cls(keys, active)


@dataclass(frozen=True)
class SigningPolicy:
    """The mode and where the ring lives; `ring` overrides the directory (tests, the CLI)."""

    mode: Mode = "off"
    keys_dir: Path | None = None
    ring: KeyRing | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise KeyRingError(f"snapshot signing mode {self.mode!r} is not one of {', '.join(MODES)}")

    def current_ring(self) -> KeyRing:
        if self.ring is not None:
            return self.ring
        if self.keys_dir is None:
            return KeyRing()
        return KeyRing.from_dir(self.keys_dir)

    def validate(self) -> KeyRing:
        """Fail fast at start: `require` needs an active key; a named directory must be a usable ring."""
        ring = self.current_ring()
        if self.mode == "require" and ring.active is None:
            where = (
                f"{self.keys_dir}/{ACTIVE_ENTRY} must name one of its keys"
                if self.keys_dir
                else f"pass --snapshot-signing-keys DIR holding the keys and an {ACTIVE_ENTRY!r} entry"
            )
            raise KeyRingError(f"snapshot signing mode require needs an active key: {where}")
        return ring

    def signer(self) -> codec.Signer | None:
        """The (key id, key) a capture signs with: the active key unless the mode is off."""
        if self.mode == "off":
            return None
        try:
            ring = self.current_ring()
        except KeyRingError as exc:
            raise SnapshotRejected(f"cannot sign the snapshot: {exc}", reason=BAD_SIGNATURE) from exc
        if ring.active is None:
            if self.mode == "require":
                raise SnapshotRejected(
                    "cannot sign the snapshot: signing is required and no active key is configured",
                    reason=UNKNOWN_KEY,
                )
            return None
        return ring.active, ring.keys[ring.active]

    def check(self, parsed: codec.Parsed) -> str:
        """Judge a parsed blob's signature; returns its state ("signed by K", "unsigned", ...) or
        raises SnapshotRejected (reason Unsigned, UnknownKey or BadSignature)."""
        sig = parsed.signature
        if sig is None:
            if self.mode == "require":
                raise SnapshotRejected(
                    f"snapshot is unsigned (format v{parsed.version}) and this shard requires signed "
                    "snapshots",
                    reason=UNSIGNED,
                )
            return "unsigned"
        if self.mode == "off":
            return f"signed with key {sig.key_id!r} (not verified: signing is off)"
        try:
            ring = self.current_ring()
        except KeyRingError as exc:
            raise SnapshotRejected(f"cannot verify the snapshot: {exc}", reason=UNKNOWN_KEY) from exc
        return verify(sig, ring)


def verify(sig: codec.Signature, ring: KeyRing) -> str:
    """The signature's MAC under its key from `ring`, or SnapshotRejected (UnknownKey, BadSignature)."""
    key = ring.keys.get(sig.key_id)
    if key is None:
        listed = ", ".join(sorted(ring.keys)) or "none"
        raise SnapshotRejected(
            f"snapshot is signed with key id {sig.key_id!r}, which is not in this shard's key ring "
            f"(keys: {listed})",
            reason=UNKNOWN_KEY,
        )
    if not codec.mac_matches(sig, key):
        raise SnapshotRejected(
            f"snapshot signature does not match key {sig.key_id!r}: the header or manifest was changed "
            "after signing, or it was signed with another key of that name",
            reason=BAD_SIGNATURE,
        )
    return f"signed with key {sig.key_id!r}, verified"


POLICY: SigningPolicy = SigningPolicy()


def configure(policy: SigningPolicy) -> KeyRing:
    """Set the process's policy (shard start); raises KeyRingError when it cannot work."""
    global POLICY
    ring = policy.validate()
    POLICY = policy
    return ring


def current() -> SigningPolicy:
    return POLICY
