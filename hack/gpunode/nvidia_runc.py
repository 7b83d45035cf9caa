"""The GPU node's runc wrapper: what the NVIDIA container runtime does for NVIDIA_VISIBLE_DEVICES.

containerd runs every container through it (the node's default runtime). For `create`, when the
container's environment sets NVIDIA_VISIBLE_DEVICES (the chart's MPS daemon sets `all`: it must see
every GPU without taking a `nvidia.com/gpu` from the shards), the bundle's config.json gets the edits
of the node's CDI spec for those devices (device nodes with their cgroup rules, the driver mounts,
the environment); then it execs the real runc. Containers without the variable pass through untouched;
pods asking for `nvidia.com/gpu` get the same edits from containerd itself (the device plugin answers
with CDI device names). Standard library only; hack/gpunode/gpunode.py installs it with the host's
Python as interpreter.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

REAL_RUNC = os.environ.get("TW_GPUNODE_REAL_RUNC", "/opt/tw-gpunode/wrap/runc")
CDI_SPEC = os.environ.get("TW_GPUNODE_CDI_SPEC", "/var/run/cdi/tensorwasm-gpu.json")


def bundle_of(args: list[str]) -> str | None:
    if "create" not in args and "run" not in args:
        return None
    for i, arg in enumerate(args):
        if arg in ("--bundle", "-b") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--bundle="):
            return arg.split("=", 1)[1]
    return None


def apply_edits(cfg: dict[str, Any], edits: dict[str, Any]) -> None:
    process = cfg.setdefault("process", {})
    env = process.setdefault("env", [])
    for entry in edits.get("env", []):
        key = entry.split("=", 1)[0] + "="
        env[:] = [e for e in env if not e.startswith(key)] + [entry]
    linux = cfg.setdefault("linux", {})
    devices = linux.setdefault("devices", [])
    rules = linux.setdefault("resources", {}).setdefault("devices", [])
    for node in edits.get("deviceNodes", []):
        path = node["path"]
        if any(d.get("path") == path for d in devices):
            continue
        st = os.stat(path)
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        devices.append({"path": path, "type": "c", "major": major, "minor": minor,
                        "fileMode": st.st_mode & 0o777, "uid": 0, "gid": 0})  # fmt: skip
        rules.append({"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"})
    mounts = cfg.setdefault("mounts", [])
    for m in edits.get("mounts", []):
        if any(x.get("destination") == m["containerPath"] for x in mounts):
            continue
        mounts.append({"destination": m["containerPath"], "type": "bind", "source": m["hostPath"],
                       "options": m.get("options", ["ro", "nosuid", "nodev", "rbind"])})  # fmt: skip


def inject(bundle: str) -> None:
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    env = dict(e.split("=", 1) for e in cfg.get("process", {}).get("env", []) if "=" in e)
    wanted = env.get("NVIDIA_VISIBLE_DEVICES", "").strip()
    if not wanted or wanted in ("void", "none"):
        return
    with open(CDI_SPEC) as f:
        spec = json.load(f)
    by_name = {d["name"]: d["containerEdits"] for d in spec["devices"]}
    names = ["all"] if wanted == "all" else [n.strip() for n in wanted.split(",")]
    apply_edits(cfg, spec.get("containerEdits", {}))
    for name in names:
        if name in by_name:
            apply_edits(cfg, by_name[name])
    tmp = path + ".tw-gpunode"
    with open(tmp, "w") as f:
        json.dump(cfg, f)
    os.replace(tmp, path)


def main() -> None:
    args = sys.argv[1:]
    bundle = bundle_of(args)
    if bundle:
        try:
            inject(bundle)
        except Exception as exc:  # never block a container over this: say why on runc's stderr
            print(f"tw-gpunode runc wrapper: NVIDIA_VISIBLE_DEVICES not applied: {exc!r}", file=sys.stderr)
    os.execv(REAL_RUNC, [REAL_RUNC, *args])


if __name__ == "__main__":
    main()
