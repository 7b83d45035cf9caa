"""Fixtures for the image tests: the image built by `make image` (cached), unpacked once per session.

Everything under tests/image carries the `image` marker. Needs root, overlayfs, runc and the network
to Debian and PyPI on a cold build; skips with the reason where the machine cannot build images.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.image.bundle import REPO, unpack


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.image)


@dataclass(frozen=True)
class BuiltImage:
    archive: Path
    ref: str
    digest: str
    rootfs: Path
    config: dict[str, Any]
    manifest: dict[str, Any]


APT_GET = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]  # waits for another apt run's lock


def _runc() -> str:
    if shutil.which("runc") is None and shutil.which("apt-get") is not None:
        subprocess.run(
            [*APT_GET, "install", "-y", "-q", "--no-install-recommends", "runc"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            check=False,
        )
    path = shutil.which("runc")
    if path is None:
        pytest.skip("runc is not installed and could not be installed (Debian package runc)")
    return path


@pytest.fixture(scope="session")
def runc() -> str:
    if os.geteuid() != 0:
        pytest.skip("image tests need root (chroot, overlay mounts, runc)")
    return _runc()


@pytest.fixture(scope="session")
def built_image(runc: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltImage]:
    """`make image`'s build (instant when cached), unpacked from the archive it wrote."""
    result = subprocess.run(
        [sys.executable, str(REPO / "hack" / "image" / "build.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"make image failed:\n{result.stderr[-4000:]}"
    facts = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    archive = Path(facts["archive"].strip())
    rootfs = tmp_path_factory.mktemp("image") / "rootfs"
    parsed = unpack(archive, rootfs)
    yield BuiltImage(
        archive, facts["image"].strip(), facts["digest"].strip(), rootfs, parsed.config, parsed.manifest
    )
    shutil.rmtree(rootfs, ignore_errors=True)
