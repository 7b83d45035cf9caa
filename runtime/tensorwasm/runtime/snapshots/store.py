"""The local snapshot store: a directory (a PVC in Kubernetes) of content-addressed blobs.

Owns the on-disk layout `<root>/tenants/<tenant uid>/<digest>.twsnap`, atomic writes
(temp file, fsync, rename, fsync the directory), listing, retention and garbage collection.
A blob is visible only under its final name, and only after its bytes are durable, so a writer
killed at any instant leaves either the previous set of blobs or the previous set plus one
complete new blob; its temp file is ignored by readers and removed by `gc`.
Knows the codec only to read manifests; must not import the engine, accelerators or wasmtime.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import mmap
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tensorwasm.runtime.errors import BadRequest, NotFound, SnapshotRejected
from tensorwasm.runtime.snapshots import codec

log = logging.getLogger(__name__)

SUFFIX = ".twsnap"
_TEMP_PREFIX = ".tmp-"
_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
_DIGEST = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class StoredSnapshot:
    """A committed blob whose header and manifest checked out when listed."""

    path: Path
    digest: str
    manifest: codec.Manifest
    size_bytes: int


class PendingBlob:
    """A temp file being written; `commit` makes it visible atomically, leaving without it removes it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.temp_path = directory / f"{_TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        self.fd = os.open(self.temp_path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o640)
        self.committed: Path | None = None

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        """Positional write; safe from several threads at distinct offsets (GIL released)."""
        view = memoryview(data)
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def commit(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise BadRequest(f"snapshot digest {digest!r} is not 32 lowercase hex digits")
        head = os.pread(self.fd, codec.HEADER_SIZE, 0)
        if len(head) != codec.HEADER_SIZE or head[48:64].hex() != digest:
            raise SnapshotRejected("refusing to commit a blob whose header does not carry its digest")
        os.fsync(self.fd)
        final = self.directory / f"{digest}{SUFFIX}"
        os.replace(self.temp_path, final)
        fsync_dir(self.directory)
        self.committed = final
        return final

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self.committed is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp_path)

    def __enter__(self) -> PendingBlob:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (a rename or unlink in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_blob(path: Path) -> Iterator[memoryview]:
    """Read-only mmap of a blob (page cache, no copy); empty files map to an empty view."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            yield memoryview(b"")
            return
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        try:
            yield view
        finally:
            view.release()
            with contextlib.suppress(BufferError):  # a caller still holding a slice keeps it mapped
                mm.close()


def read_manifest(path: Path) -> codec.Parsed:
    """Header + manifest of one blob (touches only their pages)."""
    with open_blob(path) as view:
        return codec.parse(view)


class SnapshotStore:
    """Blobs of every tenant on this shard under one root directory."""

    def __init__(self, root: Path | str, retain: int = 3, temp_grace_s: float = 3600.0) -> None:
        if retain < 1:
            raise BadRequest(f"snapshot retention must keep at least 1 blob, got {retain}")
        self.root = Path(root)
        self.retain = retain
        self.temp_grace_s = temp_grace_s
        self._skipped: dict[Path, str] = {}

    def tenant_dir(self, tenant_uid: str) -> Path:
        if not _UID.match(tenant_uid) or tenant_uid in (".", ".."):
            raise BadRequest(f"tenant uid {tenant_uid!r} is not usable as a snapshot directory name")
        return self.root / "tenants" / tenant_uid

    def begin(self, tenant_uid: str) -> PendingBlob:
        directory = self.tenant_dir(tenant_uid)
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            fsync_dir(directory.parent)
        return PendingBlob(directory)

    def put_bytes(self, tenant_uid: str, blob: bytes, digest: str) -> Path:
        with self.begin(tenant_uid) as pending:
            pending.pwrite(blob, 0)
            os.ftruncate(pending.fd, len(blob))
            return pending.commit(digest)

    def path_of(self, tenant_uid: str, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise BadRequest(f"snapshot digest {digest!r} is not 32 lowercase hex digits")
        path = self.tenant_dir(tenant_uid) / f"{digest}{SUFFIX}"
        if not path.is_file():
            raise NotFound(f"snapshot {digest} of tenant {tenant_uid} is not in the store")
        return path

    def list(self, tenant_uid: str) -> builtins.list[StoredSnapshot]:
        """Committed blobs of one tenant, newest (generation, created_at) first; unreadable ones skipped."""
        directory = self.tenant_dir(tenant_uid)
        out: list[StoredSnapshot] = []
        if not directory.is_dir():
            return out
        for path in directory.glob(f"*{SUFFIX}"):
            try:
                parsed = read_manifest(path)
            except (SnapshotRejected, OSError, ValueError) as exc:
                # A corrupt blob is never offered for restore; it is reported (once per reason) and
                # `tensorwasm snapshot inspect` explains it.
                self._skip(path, exc.message if isinstance(exc, SnapshotRejected) else str(exc))
                continue
            if parsed.digest != path.name.removesuffix(SUFFIX) or parsed.manifest.tenant_uid != tenant_uid:
                self._skip(path, "its digest or tenant uid does not match where it is stored")
                continue
            out.append(StoredSnapshot(path, parsed.digest, parsed.manifest, parsed.file_length))
        out.sort(key=lambda s: (s.manifest.generation, s.manifest.created_at), reverse=True)
        return out

    def unreadable(self) -> dict[Path, str]:
        """Blobs that listings skipped so far, with the reason (for operators and `inspect`)."""
        return dict(self._skipped)

    def _skip(self, path: Path, reason: str) -> None:
        if self._skipped.get(path) != reason:
            self._skipped[path] = reason
            log.warning("Skipped unreadable snapshot blob path=%s reason=%s", path, reason)

    def latest(self, tenant_uid: str) -> StoredSnapshot | None:
        found = self.list(tenant_uid)
        return found[0] if found else None

    def delete(self, tenant_uid: str, digest: str) -> bool:
        try:
            path = self.path_of(tenant_uid, digest)
        except NotFound:
            return False
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return True

    def gc(self, keep: frozenset[str] = frozenset()) -> builtins.list[Path]:
        """Drop blobs past `retain` per tenant (except digests in `keep`) and abandoned temp files."""
        removed: builtins.list[Path] = []
        tenants = self.root / "tenants"
        if not tenants.is_dir():
            return removed
        now = time.time()
        for directory in sorted(p for p in tenants.iterdir() if p.is_dir()):
            for temp in directory.glob(f"{_TEMP_PREFIX}*"):
                if _temp_abandoned(temp, now, self.temp_grace_s):
                    temp.unlink(missing_ok=True)
                    removed.append(temp)
            try:
                kept = self.list(directory.name)
            except BadRequest:  # a directory that is no tenant uid: not ours to judge or delete
                self._skip(directory, "not a tenant uid directory")
                continue
            for old in kept[self.retain :]:
                if old.digest not in keep:
                    old.path.unlink(missing_ok=True)
                    removed.append(old.path)
            if removed:
                fsync_dir(directory)
        return removed


def _temp_abandoned(path: Path, now: float, grace_s: float) -> bool:
    """A temp file is abandoned when its writer process is gone or it is older than the grace time."""
    try:
        pid = int(path.name[len(_TEMP_PREFIX) :].split("-", 1)[0])
        age = now - path.stat().st_mtime
    except (ValueError, FileNotFoundError):
        return True
    if age > grace_s:
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
