"""The GPU node's runc wrapper (hack/gpunode/nvidia_runc.py): what it writes into a bundle's config.json
for NVIDIA_VISIBLE_DEVICES, from a CDI spec, with real device nodes of this machine (/dev/null, /dev/zero)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "hack" / "gpunode" / "nvidia_runc.py"


def load() -> Any:
    spec = importlib.util.spec_from_file_location("nvidia_runc", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CDI = {
    "cdiVersion": "0.6.0",
    "kind": "tensorwasm.io/gpu",
    "devices": [
        {"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/zero"}]}},
        {"name": "all", "containerEdits": {"deviceNodes": [{"path": "/dev/zero"}]}},
    ],
    "containerEdits": {
        "deviceNodes": [{"path": "/dev/null"}],
        "mounts": [
            {"hostPath": "/usr/lib", "containerPath": "/usr/local/nvidia", "options": ["ro", "rbind"]}
        ],
        "env": ["LD_LIBRARY_PATH=/usr/local/nvidia/lib64"],
    },
}


@pytest.fixture
def runc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    spec = tmp_path / "cdi.json"
    spec.write_text(json.dumps(CDI))
    module = load()
    monkeypatch.setattr(module, "CDI_SPEC", str(spec))
    return module


def bundle(tmp_path: Path, env: list[str]) -> Path:
    b = tmp_path / "bundle"
    b.mkdir(exist_ok=True)
    cfg = {"process": {"env": env}, "linux": {"resources": {}}, "mounts": []}
    (b / "config.json").write_text(json.dumps(cfg))
    return b


def test_all_devices_get_the_spec_edits_once(runc: Any, tmp_path: Path) -> None:
    b = bundle(tmp_path, ["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=all", "LD_LIBRARY_PATH=/old"])
    runc.inject(str(b))
    runc.inject(str(b))  # a retried create must not add anything twice
    cfg = json.loads((b / "config.json").read_text())
    null, zero = os.stat("/dev/null").st_rdev, os.stat("/dev/zero").st_rdev
    devices = {d["path"]: (d["type"], d["major"], d["minor"]) for d in cfg["linux"]["devices"]}
    assert devices == {
        "/dev/null": ("c", os.major(null), os.minor(null)),
        "/dev/zero": ("c", os.major(zero), os.minor(zero)),
    }
    rules = cfg["linux"]["resources"]["devices"]
    assert len(rules) == 2 and all(r["allow"] and r["access"] == "rwm" for r in rules)
    assert cfg["mounts"] == [
        {"destination": "/usr/local/nvidia", "type": "bind", "source": "/usr/lib", "options": ["ro", "rbind"]}
    ]
    env = cfg["process"]["env"]
    assert "LD_LIBRARY_PATH=/usr/local/nvidia/lib64" in env and "LD_LIBRARY_PATH=/old" not in env
    assert "PATH=/bin" in env


@pytest.mark.parametrize("env", [["PATH=/bin"], ["NVIDIA_VISIBLE_DEVICES=void"], ["NVIDIA_VISIBLE_DEVICES="]])
def test_containers_without_visible_devices_pass_through_untouched(
    runc: Any, tmp_path: Path, env: list[str]
) -> None:
    b = bundle(tmp_path, env)
    before = (b / "config.json").read_text()
    runc.inject(str(b))
    assert (b / "config.json").read_text() == before


def test_only_create_and_run_carry_a_bundle(runc: Any) -> None:
    assert runc.bundle_of(["--root", "r", "create", "--bundle", "/b", "id"]) == "/b"
    assert runc.bundle_of(["create", "--bundle=/c", "id"]) == "/c"
    assert runc.bundle_of(["--root", "r", "start", "id"]) is None
    assert runc.bundle_of(["delete", "--bundle", "/b", "id"]) is None
