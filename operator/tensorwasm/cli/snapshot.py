"""`tensorwasm snapshot inspect FILE`: print a snapshot blob's manifest and signature state, and verify
every byte of it (the signature too, given the key ring with --signing-keys).

Owns the command only; the format lives in tensorwasm.runtime.snapshots.codec (imported lazily so
`tensorwasm --help` works with the base install). Exit 0 = intact, 1 = refused (the reason is printed
on stderr), 2 = unreadable file. Must not import wasmtime or cuda.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("snapshot", help="inspect snapshot blobs")
    actions = parser.add_subparsers(dest="snapshot_command", metavar="ACTION", required=True)
    inspect = actions.add_parser("inspect", help="print the manifest and verify every chunk of a blob")
    inspect.add_argument("file", type=Path, help="a .twsnap blob")
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")
    inspect.add_argument(
        "--signing-keys",
        type=Path,
        metavar="DIR",
        help="verify the signature with this key ring (a directory like the mounted Secret: <key id> files)",
    )
    inspect.set_defaults(handler=inspect_command)


def inspect_command(args: argparse.Namespace) -> int:
    from tensorwasm.runtime.errors import SnapshotRejected
    from tensorwasm.runtime.snapshots import codec, signing
    from tensorwasm.runtime.snapshots.store import open_blob

    try:
        ring = signing.KeyRing.from_dir(args.signing_keys) if args.signing_keys else None
    except signing.KeyRingError as exc:
        print(f"error: --signing-keys: {exc}", file=sys.stderr)
        return 2
    try:
        with open_blob(args.file) as blob:
            parsed = codec.verify_all(blob)
            codec.check_decodes(blob, parsed.manifest)  # "verified" means every chunk decodes too
            if parsed.signature is None:
                state = "unsigned"
            elif ring is None:
                state = f"signed with key {parsed.signature.key_id!r} (not verified: no --signing-keys given)"
            else:
                state = signing.verify(parsed.signature, ring)
    except OSError as exc:
        print(f"error: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except SnapshotRejected as exc:
        print(f"error: {args.file} is not a valid snapshot: {exc.message}", file=sys.stderr)
        return 1
    except Exception as exc:  # a reader bug must still end in a verdict, not a traceback
        print(f"error: {args.file} is not a valid snapshot: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    m = parsed.manifest
    if args.json:
        sig = None
        if parsed.signature is not None:
            sig = {"key_id": parsed.signature.key_id, "state": "verified" if ring else "not verified"}
        doc = {"digest": parsed.digest, "size_bytes": parsed.file_length, "signature": sig, **m.to_json()}
        print(json.dumps(doc, indent=2))
        return 0
    print(render(parsed, state))
    return 0


def render(parsed: Any, signature: str = "unsigned") -> str:
    m = parsed.manifest
    ratio = m.raw_bytes / m.stored_bytes if m.stored_bytes else 1.0
    lines = [
        f"snapshot     {parsed.digest}  (format v{m.version}, verified: header, manifest and "
        f"{len(m.chunks)} chunks)",
        f"signature    {signature}",
        f"tenant       {m.tenant or '-'} (uid {m.tenant_uid})",
        f"module       sha256:{m.module_sha256}",
        f"generation   {m.generation}",
        f"created      {m.created_at}",
        f"size         {_size(m.raw_bytes)} state in {_size(parsed.file_length)} blob "
        f"({ratio:.2f}x, chunks of {_size(m.chunk_size)})",
        "",
        f"{'REGION':<22}{'SIZE':>12}{'CHUNKS':>8}{'ZSTD':>6}{'STORED':>12}",
    ]
    for r in m.regions:
        chunks = m.chunks[r.first_chunk : r.first_chunk + r.chunk_count]
        name = r.kind if r.handle is None else f"gpu_buffer {r.handle}"
        zstd = sum(c.codec == "zstd" for c in chunks)
        stored = sum(c.stored for c in chunks)
        lines.append(f"{name:<22}{_size(r.size):>12}{r.chunk_count:>8}{zstd:>6}{_size(stored):>12}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
