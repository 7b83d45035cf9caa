"""The shipped sample modules are the fixtures' WAT compiled, and the sample Tenant matches them.

README's user path applies crds/samples with examples/modules/echo.wasm: a stale digest or a
function the module does not export would leave a pasted Tenant Degraded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import wasmtime
import yaml

REPO = Path(__file__).resolve().parents[2]
MODULES = sorted((REPO / "examples" / "modules").glob("*.wasm"))


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_sample_module_is_its_fixture_compiled(module: Path) -> None:
    wat = (REPO / "tests" / "fixtures" / module.with_suffix(".wat").name).read_text()
    assert module.read_bytes() == wasmtime.wat2wasm(wat), f"rebuild {module.name}: make sample-modules"


def test_sample_tenant_names_the_shipped_module_and_its_exports() -> None:
    assert MODULES, "examples/modules holds the sample .wasm files"
    tenant = yaml.safe_load((REPO / "crds" / "samples" / "tensorwasm.io_v1alpha1_tenant.yaml").read_text())
    module = (REPO / "examples" / "modules" / "echo.wasm").read_bytes()
    assert tenant["spec"]["module"]["sha256"] == hashlib.sha256(module).hexdigest()
    exports = {e.name for e in wasmtime.Module(wasmtime.Engine(), module).exports}
    assert set(tenant["spec"]["functions"]) <= exports


def test_chart_selftest_module_is_the_sample_echo() -> None:
    chart_copy = REPO / "helm" / "tensorwasm" / "files" / "selftest" / "echo.wasm"
    assert chart_copy.read_bytes() == (REPO / "examples" / "modules" / "echo.wasm").read_bytes(), (
        "run `make helm-sync`"
    )
