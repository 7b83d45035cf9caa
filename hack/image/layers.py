"""The builder's layer store: overlayfs upper directories, mounted to run steps and to flatten a stage.

Owns Layer (one cached directory of changes plus its work dir and done-marker), the mounts (an
overlay of layers, bind and proc mounts, always unmounted), the flattening of a stage into one
layer tar, and pruning. Needs root and overlayfs. Must import nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Layer:
    """One cached directory of file-system changes (an overlayfs upper dir)."""

    key: str
    root: Path

    @property
    def diff(self) -> Path:
        return self.root / "diff"

    @property
    def done(self) -> bool:
        return (self.root / "done").exists()

    def begin(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)  # a half-made layer from an interrupted build
        (self.root / "diff").mkdir(parents=True)
        (self.root / "work").mkdir()

    def commit(self) -> None:
        shutil.rmtree(self.root / "work", ignore_errors=True)
        (self.root / "done").write_text(str(time.time()))


@contextlib.contextmanager
def mounted(args: Sequence[str], target: Path) -> Iterator[Path]:
    subprocess.run(["mount", *args, str(target)], check=True, capture_output=True)
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


@contextlib.contextmanager
def overlay(lowers: Sequence[Layer], scratch: Path, upper: Layer | None = None) -> Iterator[Path]:
    """Mount the layers (bottom first) at a scratch dir; writes go to `upper` when given."""
    merged = Path(tempfile.mkdtemp(dir=scratch, prefix="merged-"))
    empty = Path(tempfile.mkdtemp(dir=scratch, prefix="empty-"))
    # overlayfs wants two lower dirs when there is no upper: an empty one at the bottom costs nothing.
    lower_dirs = [str(layer.diff) for layer in reversed(lowers)] + ([] if upper else [str(empty)])
    options = "lowerdir=" + ":".join(lower_dirs)
    if upper is not None:
        options += f",upperdir={upper.diff},workdir={upper.root / 'work'}"
    try:
        with mounted(["-t", "overlay", "overlay", "-o", options], merged):
            yield merged
    finally:
        merged.rmdir()
        empty.rmdir()


def write_rootfs_tar(layers: Sequence[Layer], scratch: Path, out: Path) -> None:
    """The final stage's merged file system as one layer tar (whiteouts applied by overlayfs)."""
    with overlay(layers, scratch) as root:
        subprocess.run(
            ["tar", "--create", "--file", str(out), "--directory", str(root), "--sort=name",
             "--numeric-owner", "--xattrs", "--xattrs-include=security.capability", "--one-file-system", "."],
            check=True,
        )  # fmt: skip


def prune(cache: Path, used: set[str]) -> None:
    """Drop layers the last build did not use (older versions of the recipe or sources)."""
    for entry in (cache / "layers").glob("*"):
        if entry.name not in used:
            shutil.rmtree(entry, ignore_errors=True)
