"""Test and dev tooling (tensorwasm.dev) stays out of the wheel and the image, and says so when absent."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

import tensorwasm.dev
from tensorwasm.cli import dev

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_packages_leave_the_dev_root_out() -> None:
    hatch = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    assert "dev/tensorwasm" not in hatch["targets"]["wheel"]["packages"]
    assert "dev" in hatch["dev-mode-dirs"]
    assert Path(tensorwasm.dev.__file__).is_relative_to(REPO / "dev")


def test_dev_commands_explain_a_missing_checkout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(dev.importlib.util, "find_spec", lambda name: None)
    assert dev.dev_tools_missing() is True
    assert "source checkout" in capsys.readouterr().err
