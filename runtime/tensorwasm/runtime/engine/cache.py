"""The on-disk cache of compiled modules, authenticated so that only artifacts this shard wrote load.

Owns the file layout (`<sha256>-<engine fingerprint>.cwasm`), atomic writes, and the integrity
check. wasmtime loads a cached artifact as native code, so a file must prove it was written by a
holder of the cache key: each file is `MAGIC | HMAC-SHA256(key, name | artifact) | artifact`.
A file without a valid tag (foreign, torn, from another key or engine) is deleted and the module
is compiled again, never loaded. The key comes from a file the operator mounts (a Secret) or, by
default, from `<cache dir>/.cache-key` (created 0600 on first use, shared by shards that share the
volume). Pure bytes + file I/O; must not import wasmtime (the Engine serializes and deserializes).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import tempfile
from hashlib import sha256
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"TWCACHE1"
_TAG_BYTES = 32
KEY_FILE = ".cache-key"
MIN_KEY_BYTES = 16


class CacheKeyError(ValueError):
    """The cache key file cannot be used (missing, unreadable, too short)."""


def load_or_create_key(cache_dir: Path, key_file: Path | None = None) -> bytes:
    """The MAC key: `key_file` when given, else `<cache_dir>/.cache-key`, created if absent."""
    if key_file is not None:
        try:
            key = key_file.read_bytes().strip()
        except OSError as exc:
            raise CacheKeyError(f"cannot read cache key file {key_file}: {exc.strerror}") from exc
        if len(key) < MIN_KEY_BYTES:
            raise CacheKeyError(f"cache key file {key_file} holds fewer than {MIN_KEY_BYTES} bytes")
        return key
    path = cache_dir / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < MIN_KEY_BYTES:
            raise CacheKeyError(f"cache key file {path} holds fewer than {MIN_KEY_BYTES} bytes") from None
        return key
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
        out.flush()
        os.fsync(out.fileno())
    return key


class CompileCache:
    """Authenticated files of compiled artifacts under one directory, keyed by name."""

    def __init__(self, directory: Path, key: bytes) -> None:
        self.directory = directory
        self._key = key

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.cwasm"

    def read(self, name: str) -> bytes | None:
        """The artifact stored under `name` if its tag proves this key wrote it; else None
        (and a file that fails the check is deleted so the next write replaces it)."""
        path = self.path(name)
        try:
            data = path.read_bytes()  # into memory, never mmap: a truncated file must not SIGBUS us
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("Skipped unreadable cached module path=%s reason=%s", path, exc.strerror)
            return None
        head = len(MAGIC) + _TAG_BYTES
        if len(data) > head and data[: len(MAGIC)] == MAGIC:
            artifact = data[head:]
            if hmac.compare_digest(data[len(MAGIC) : head], self._tag(name, artifact)):
                return artifact
        log.warning("Discarded cached module without a valid tag path=%s bytes=%d", path, len(data))
        path.unlink(missing_ok=True)
        return None

    def write(self, name: str, artifact: bytes) -> None:
        """Store atomically (temp file, fsync, rename); a failure only costs a later recompile."""
        path = self.path(name)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".cwasm")
        except OSError as exc:
            log.warning("Skipped caching compiled module path=%s reason=%s", path, exc.strerror)
            return
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(MAGIC + self._tag(name, artifact))
                out.write(artifact)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("Skipped caching compiled module path=%s reason=%s", path, exc.strerror)
            Path(tmp).unlink(missing_ok=True)

    def discard(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def _tag(self, name: str, artifact: bytes) -> bytes:
        mac = hmac.new(self._key, name.encode() + b"\0", sha256)
        mac.update(artifact)
        return mac.digest()
