"""Run an OCI image archive with runc, as a kubelet under Pod Security `restricted` would.

Owns turning the archive into a runc bundle (the layers unpacked into rootfs/, a config.json built
from the image config) and the pure builder of that config. Must not import the tensorwasm package:
what runs is the image, not the checkout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack" / "image"))
import ociarchive  # noqa: E402 - a script beside the builder, not a package

# The image keeps nothing writable: /tmp is a tmpfs here, an emptyDir in the chart.
TMPFS_OPTIONS = ["nosuid", "nodev", "mode=1777", "size=65536k"]


def unpack(archive: Path, rootfs: Path) -> ociarchive.ParsedArchive:
    """Unpack the image's layers, bottom first, from the archive itself (not from the build cache)."""
    parsed = ociarchive.read_archive(archive)
    rootfs.mkdir(parents=True)
    for layer in parsed.manifest["layers"]:
        member = "blobs/sha256/" + layer["digest"].split(":", 1)[1]
        gzipped = layer["mediaType"] == ociarchive.MEDIA_LAYER_GZIP
        reader = subprocess.Popen(["tar", "-xOf", str(archive), member], stdout=subprocess.PIPE)
        subprocess.run(
            ["tar", "-x", *(["-z"] if gzipped else []), "--numeric-owner", "-C", str(rootfs), "-f", "-"],
            stdin=reader.stdout,
            check=True,
        )
        assert reader.wait() == 0
    return parsed


def _mount(destination: str, kind: str, source: str, *options: str) -> dict[str, Any]:
    return {"destination": destination, "type": kind, "source": source, "options": list(options)}


def build_runc_config(
    image_config: dict[str, Any],
    rootfs: Path,
    args: list[str] | None = None,
    *,
    binds: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """config.json for the image: its user, env, cwd and entrypoint; read-only root, no capabilities.

    `args` replace the image's Cmd (as a pod's `args` do). The container shares the host's network
    namespace so the host reaches its port (the real node gives pods their own; see issue 11).
    """
    runtime = image_config["config"]
    uid, _, gid = runtime.get("User", "0").partition(":")
    no_caps: list[str] = []
    mounts = [
        _mount("/proc", "proc", "proc"),
        _mount("/dev", "tmpfs", "tmpfs", "nosuid", "strictatime", "mode=755", "size=65536k"),
        _mount(
            "/dev/pts", "devpts", "devpts", "nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"
        ),
        _mount("/dev/shm", "tmpfs", "shm", "nosuid", "noexec", "nodev", "mode=1777", "size=65536k"),
        _mount("/sys", "bind", "/sys", "rbind", "nosuid", "noexec", "nodev", "ro"),
        _mount("/tmp", "tmpfs", "tmpfs", *TMPFS_OPTIONS),
    ]
    for destination, source in (binds or {}).items():
        mounts.append(
            {"destination": destination, "type": "bind", "source": str(source), "options": ["rbind", "ro"]}
        )
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": int(uid), "gid": int(gid or uid)},
            "args": list(runtime.get("Entrypoint") or [])
            + list(args if args is not None else runtime.get("Cmd") or []),
            "env": list(runtime.get("Env") or []),
            "cwd": runtime.get("WorkingDir") or "/",
            "capabilities": {
                kind: no_caps for kind in ("bounding", "effective", "inheritable", "permitted", "ambient")
            },
            "noNewPrivileges": True,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "tensorwasm",
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": kind} for kind in ("pid", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


def write_bundle(bundle: Path, config: dict[str, Any]) -> Path:
    """A bundle dir holding config.json; its root is the shared unpacked tree (read-only in there)."""
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(config, indent=1))
    return bundle
