"""The local tenant source: a YAML tenants file, for standalone shards, the demo and benchmarks.

Owns `LocalFileSource` and `read_tenants_file`. The file is read at start (a file that cannot be
used at all stops the shard with a clear message) and re-read when its modification time changes;
a broken entry refuses that tenant alone (reason InvalidSpec), a broken file on reload keeps the
tenants as they are. Format (see docs/runtime.md):

    tenants:
      - name: alpha
        token: s3cret-alpha            # or tokenFile: path
        module: {path: echo.wat, sha256: <hex>}   # or url: https://...
        functions: [echo]
        limits: {linearMemory: 16Mi, timeoutMs: 500, maxConcurrency: 2, queueLength: 8, maxBodyBytes: 64Ki}

Must not import aiohttp, wasmtime, cuda or kubernetes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from tensorwasm.api.fields import InvalidSpec
from tensorwasm.runtime.shard import Shard, TenantStatus
from tensorwasm.runtime.tenancy.config import TenantConfig, parse_local_tenant

log = logging.getLogger(__name__)


class TenantsFileError(ValueError):
    """The tenants file as a whole is unusable (unreadable, not YAML, wrong shape, duplicate names)."""


@dataclass(frozen=True)
class TenantsFile:
    configs: tuple[TenantConfig, ...]
    failed: Mapping[str, TenantStatus]


MAX_TENANTS_FILE_BYTES = 16 << 20


def read_tenants_file(path: Path) -> TenantsFile:
    """Parse the file; per-tenant errors become `failed` entries, file-level errors raise.

    Total: whatever the bytes, the result is a TenantsFile or a TenantsFileError (never another
    exception), and an entry whose parsing fails in any way fails alone (InvalidSpec).
    """
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_TENANTS_FILE_BYTES + 1)
    except OSError as exc:
        raise TenantsFileError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(raw) > MAX_TENANTS_FILE_BYTES:
        raise TenantsFileError(f"{path}: larger than {MAX_TENANTS_FILE_BYTES} bytes")
    try:
        doc = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise TenantsFileError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise TenantsFileError(f"{path}: not valid YAML: {exc}") from exc
    except (RecursionError, ValueError, TypeError) as exc:  # pathological nesting, odd scalars
        raise TenantsFileError(f"{path}: cannot be parsed: {type(exc).__name__}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("tenants"), list):
        raise TenantsFileError(f"{path}: expected a mapping with a 'tenants' list")
    unknown = sorted(set(doc) - {"tenants"})
    if unknown:
        raise TenantsFileError(f"{path}: unknown top-level field(s) {', '.join(unknown)}")
    configs: list[TenantConfig] = []
    failed: dict[str, TenantStatus] = {}
    seen: set[str] = set()
    for i, entry in enumerate(doc["tenants"]):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise TenantsFileError(f"{path}: tenants[{i}].name: every tenant needs a name")
        if name in seen:
            raise TenantsFileError(f"{path}: tenants[{i}].name: tenant {name!r} is listed twice")
        seen.add(name)
        try:
            configs.append(parse_local_tenant(entry, f"tenants[{i}]", path.parent))
        except InvalidSpec as exc:
            failed[name] = TenantStatus(False, exc.reason, str(exc))
        except UnicodeDecodeError:  # a token or kernel file that is not text
            failed[name] = TenantStatus(
                False, InvalidSpec.reason, f"tenants[{i}]: a token or kernel file it names is not UTF-8"
            )
        except Exception as exc:  # anything else about one entry stays with that entry
            log.warning("Refused tenants file entry name=%s", name, exc_info=exc)
            failed[name] = TenantStatus(
                False, InvalidSpec.reason, f"tenants[{i}]: cannot be parsed ({type(exc).__name__}: {exc})"
            )
    return TenantsFile(tuple(configs), failed)


class LocalFileSource:
    """Feeds the shard from a tenants file, re-reading it when it changes."""

    def __init__(self, path: Path, poll_s: float = 2.0) -> None:
        self.path = path
        self.poll_s = poll_s
        self._mtime_ns = -1
        self._first: TenantsFile | None = None

    def first_read(self) -> TenantsFile:
        """Read at start; raises TenantsFileError so the process can fail fast."""
        self._mtime_ns = self._stat()
        self._first = read_tenants_file(self.path)
        return self._first

    async def run(self, shard: Shard) -> None:
        first = self._first if self._first is not None else await asyncio.to_thread(self.first_read)
        # Loads run on their own: a slow or stuck one never delays noticing the next change.
        await shard.sync(first.configs, first.failed, wait=False)
        while True:
            await asyncio.sleep(self.poll_s)
            mtime = self._stat()
            if mtime == self._mtime_ns:
                continue
            self._mtime_ns = mtime
            try:
                current = await asyncio.to_thread(read_tenants_file, self.path)
                log.info("Reloaded tenants file path=%s tenants=%d", self.path, len(current.configs))
                await shard.sync(current.configs, current.failed, wait=False)
            except TenantsFileError as exc:
                log.error("Ignored tenants file change, keeping current tenants: %s", exc)
            except Exception as exc:  # the source loop outlives any one bad reload
                log.error("Ignored tenants file change after an unexpected error: %s", exc, exc_info=exc)

    def _stat(self) -> int:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return -1
