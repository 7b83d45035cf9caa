"""`tensorwasm tenant check`: the model's verdict and the planner's reservation, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorwasm.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def test_the_sample_tenant_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tenant", "check", str(REPO / "crds/samples/tensorwasm.io_v1alpha1_tenant.yaml")]) == 0
    assert "tenant/alpha: valid; reserves gpuMemory 256Mi" in capsys.readouterr().out


def test_an_invalid_tenant_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "t.yaml"
    bad.write_text(
        "apiVersion: tensorwasm.io/v1alpha1\nkind: Tenant\nmetadata: {name: beta}\n"
        "spec: {module: {url: 'https://x/m', sha256: '"
        + "a"
        * 64
        + "'}, functions: [f], limits: {gpuMemory: 0}}\n"
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: ignored}\n"
    )
    assert main(["tenant", "check", str(bad)]) == 1
    assert "tenant/beta: invalid: spec.limits.gpuMemory: must be at least 1 bytes" in capsys.readouterr().out
    assert main(["tenant", "check", str(tmp_path / "missing.yaml")]) == 2
