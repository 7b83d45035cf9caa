"""The chart README (`helm show readme`) is generated from values.yaml and committed current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_chart_readme_is_current() -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "hack" / "chart_readme.py"), "--check"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr


def test_every_documented_value_has_a_row() -> None:
    readme = (REPO / "helm" / "tensorwasm" / "README.md").read_text()
    for key in ("shard.snapshots.persistence.enabled", "tests.enabled", "mps.pipeDir", "crds.keep"):
        assert f"| `{key}` |" in readme
