"""`tensorwasm --version` names the version pyproject.toml declares."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tensorwasm.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def test_version_flag_prints_the_project_version(capsys: pytest.CaptureFixture[str]) -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tensorwasm {declared}"
