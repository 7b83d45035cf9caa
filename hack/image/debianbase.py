"""What `FROM debian:<suite>-slim` is on a machine without a registry: mmdebstrap's minbase, slimmed.

Owns the Debian side of the build: recognising a slim Debian base, the mmdebstrap command that
makes it (same suite and package set as the published image, dpkg path-excludes of its "slimify",
merged /usr), cleaning it as the published images are, and installing the host tools the build
needs. Must import nothing but the standard library and its sibling scripts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from failures import BuildError, diagnose
from layers import Layer

# What debian:<suite>-slim is: Debian's minbase variant with docs, man pages and locales excluded
# by dpkg (debuerreotype's "slimify"); the same path-excludes stay in the image for later installs.
SLIM_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/lintian/*",
)
DEBIAN_MIRROR = os.environ.get("TENSORWASM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
_DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEBIAN_SECURITY_MIRROR = os.environ.get("TENSORWASM_DEBIAN_SECURITY_MIRROR", _DEFAULT_SECURITY_MIRROR)
HOST_TOOLS = {"mmdebstrap": "mmdebstrap", "chroot": "coreutils", "tar": "tar", "mount": "mount"}


def ensure_host_tools() -> None:
    """Install what the build needs from Debian (a fresh machine has no mmdebstrap)."""
    if os.geteuid() != 0:
        raise BuildError("make image needs root (chroot and overlay mounts); run it as root")
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise BuildError(f"missing host tools and no apt-get to install them: Debian packages {missing}")
    print(f"image: installing host packages {' '.join(missing)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # `make setup` runs hack/node/deps.sh's apt-get beside this one: wait for the lock, as it does.
    apt_get = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]
    install = [*apt_get, "install", "-y", "-q", "--no-install-recommends", *missing]
    result = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:  # stale package lists on a fresh machine: update once, then again
        subprocess.run([*apt_get, "update", "-q"], env=env, capture_output=True, check=False)
        result = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        problems = diagnose(result.stdout + result.stderr) or [result.stderr.strip()[-500:]]
        raise BuildError("cannot install the host tools: " + "; ".join(problems))


_DEBIAN_SLIM = re.compile(r"^(?:docker\.io/)?(?:library/)?debian:(?P<suite>[a-z]+)-slim$")


def debian_suite(base: str) -> str:
    match = _DEBIAN_SLIM.match(base)
    if match is None:
        raise BuildError(
            f"FROM {base}: the daemonless build makes debian:<suite>-slim bases only (no registry here)"
        )
    return match.group("suite")


def recipe_parts(suite: str) -> tuple[str, ...]:
    """Everything that decides the base's contents (its cache key)."""
    # The default security mirror goes without saying (and keeps the keys of existing caches).
    security = () if DEBIAN_SECURITY_MIRROR == _DEFAULT_SECURITY_MIRROR else (DEBIAN_SECURITY_MIRROR,)
    return (suite, DEBIAN_MIRROR, *SLIM_DPKG_EXCLUDES, *security)


def mmdebstrap_command(suite: str, target: Path) -> list[str]:
    return [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=directory",
        "--quiet",
        # merged /usr by symlinks and the usr-is-merged marker, as the published images do: the
        # default (the usrmerge package) would drag perl (47 MiB) into the image.
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        *(f"--dpkgopt={option}" for option in SLIM_DPKG_EXCLUDES),
        suite,
        str(target),
        f"deb {DEBIAN_MIRROR} {suite} main",
        f"deb {DEBIAN_MIRROR} {suite}-updates main",
        f"deb {DEBIAN_SECURITY_MIRROR} {suite}-security main",
    ]


def build_debian_base(layer: Layer, suite: str) -> None:
    layer.begin()
    command = mmdebstrap_command(suite, layer.diff)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"mmdebstrap {suite} failed:\n{result.stderr[-2000:]}")
    # Like the published images: the runtime bind-mounts these; the build's copies would leak.
    for name in ("etc/resolv.conf", "etc/hostname"):
        path = layer.diff / name
        path.unlink(missing_ok=True)
        path.write_text("")
    for leftover in (
        "var/lib/apt/lists/*",
        "var/cache/apt/*.bin",
        "var/cache/apt/archives/*.deb",
        "var/log/*.log",
    ):
        for item in layer.diff.glob(leftover):
            if item.is_file():
                item.unlink()
    layer.commit()
