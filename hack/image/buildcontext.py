"""The build context: which files a COPY takes (.dockerignore as Docker reads it) and their digest.

Owns the selection of context files, the digest that keys a COPY layer, and the copy itself
(root-owned, modes and mtimes kept, as Docker does). Must import nothing but the standard library
and its sibling scripts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import containerfile as cf
from failures import BuildError


def context_files(context: Path) -> list[str]:
    """Files (and symlinks) of the build context that .dockerignore lets through, sorted."""
    ignore_file = context / ".dockerignore"
    rules = cf.parse_ignore(ignore_file.read_text()) if ignore_file.exists() else []
    reincluded = [pattern.split("/")[0] for excluded, pattern in rules if not excluded]
    kept: list[str] = []
    for directory, subdirs, files in os.walk(context):
        relative_dir = os.path.relpath(directory, context)
        prefix = "" if relative_dir == "." else relative_dir + "/"
        # Prune ignored directories that no `!` rule can reach into (.git, .venv are large).
        subdirs[:] = sorted(
            d
            for d in subdirs
            if not cf.is_ignored(prefix + d, rules)
            or any(fnmatch.fnmatchcase((prefix + d).split("/")[0], top) for top in reincluded)
        )
        kept.extend(prefix + f for f in sorted(files) if not cf.is_ignored(prefix + f, rules))
    return sorted(kept)


def context_digest(context: Path, files: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for name in files:
        path = context / name
        digest.update(name.encode() + b"\0")
        if path.is_symlink():
            digest.update(b"link:" + os.readlink(path).encode())
        else:
            digest.update(oct(path.stat().st_mode & 0o7777).encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def select_sources(files: Sequence[str], source: str) -> list[tuple[str, str]]:
    """(context file, path relative to the destination) for one COPY source: a file or a directory."""
    prefix = os.path.normpath(source).lstrip("/")
    if prefix == ".":
        return [(name, name) for name in files]
    if prefix in files:
        return [(prefix, Path(prefix).name)]
    return [(name, name[len(prefix) + 1 :]) for name in files if name.startswith(prefix + "/")]


def copy_context(
    context: Path, files: Sequence[str], sources: Sequence[str], target: Path, into: bool
) -> None:
    """COPY from the build context: root-owned, modes and mtimes kept (as Docker does)."""
    for source in sources:
        chosen = select_sources(files, source)
        if not chosen:
            raise BuildError(f"COPY {source}: nothing in the build context (or all of it in .dockerignore)")
        single_file = len(chosen) == 1 and chosen[0][0] == os.path.normpath(source).lstrip("/")
        for name, relative in chosen:
            destination = target if single_file and not into else target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            origin = context / name
            if origin.is_symlink():
                destination.symlink_to(os.readlink(origin))
                os.lchown(destination, 0, 0)
                continue
            shutil.copy2(origin, destination)
            os.chown(destination, 0, 0)
