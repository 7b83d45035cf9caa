"""Rendering the Helm chart for tests: one `helm template` helper for the unit tests (the alerts,
with the helm binary the control-plane build provides) and the cluster tests (with the session's)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "helm" / "tensorwasm"
RELEASE = "tensorwasm"


def set_args(values: Sequence[str]) -> list[str]:
    """--set per value; a "str:" prefix means --set-string (label values such as "true")."""
    args: list[str] = []
    for value in values:
        args += ["--set-string", value[4:]] if value.startswith("str:") else ["--set", value]
    return args


def render(
    helm: Path,
    *sets: str,
    namespace: str = "tw-chart",
    extra: tuple[str, ...] = (),
    only: str = "",
    env: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The chart's objects as `helm template` renders them; the `helm test` hooks only when `only`
    names their template."""
    selected = ("--show-only", only) if only else ("--skip-tests",)
    args = ["template", RELEASE, str(CHART), "--namespace", namespace, *selected, *extra, *set_args(sets)]
    proc = subprocess.run(
        [str(helm), *args],
        env=dict(env or os.environ),
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )
    if proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
