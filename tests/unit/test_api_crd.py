"""crds/ is what the spec models generate, and the CRD states every field's default, enum and bounds.

The CRD is generated (`make crds`), so the first test proves the files are current; the second
walks the model and reads each field back from the YAML, so a generator bug cannot hide a bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tensorwasm.api.crd import render_crds
from tensorwasm.api.fields import Field, fields_of
from tensorwasm.api.quantity import quantity_bytes
from tensorwasm.api.snapshot import SnapshotSpec
from tensorwasm.api.tenant import TenantSpec

REPO = Path(__file__).resolve().parents[2]


def test_crds_are_current_in_the_repo_and_the_chart() -> None:
    for name, text in render_crds().items():
        assert (REPO / "crds" / name).read_text() == text, f"crds/{name} is stale: run make crds"
        chart = REPO / "helm/tensorwasm/files/crds" / name
        assert chart.read_text() == text, f"{chart} is stale: run make crds"


def spec_schema(name: str) -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / name).read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def check_model(model: type, schema: dict[str, Any], path: str, seen: list[str]) -> None:
    required = set(schema.get("required", []))
    assert set(schema["properties"]) == {f.name for _, f in fields_of(model)}, path
    for attribute, field in fields_of(model):
        prop, where = schema["properties"][field.name], f"{path}.{field.name}"
        seen.append(where)
        assert (field.name in required) == field.required, where
        assert prop.get("default") == field.default, where
        check_field(field, prop, where, seen)
        if field.default is not None and field.kind in ("integer", "quantity", "string"):
            # The model's Python default is the CRD default, parsed.
            python_default = model.__dataclass_fields__[attribute].default
            parsed = quantity_bytes(field.default) if field.kind == "quantity" else field.default
            assert python_default == parsed, where


def check_field(field: Field, prop: dict[str, Any], where: str, seen: list[str]) -> None:
    if field.kind == "integer":
        assert (prop["type"], prop.get("minimum"), prop.get("maximum")) == (
            "integer", field.minimum, field.maximum,
        ), where  # fmt: skip
    elif field.kind == "quantity":
        assert prop["x-kubernetes-int-or-string"] is True and prop["maxLength"] == field.max_length, where
        rule = prop["x-kubernetes-validations"][0]["rule"]
        # Bounds of a quantity live in CEL: both appear, spelled as quantities.
        assert rule.count("compareTo(quantity(") == 2 and "asApproximateFloat()" in rule, where
        lo, hi = (quantity_bytes(part.split("'")[1]) for part in rule.split("compareTo(quantity(")[1:])
        assert (lo, hi) == (field.minimum, field.maximum), where
    elif field.kind == "string":
        assert prop["type"] == "string", where
        assert prop.get("enum", []) == list(field.enum), where
        got = (prop.get("minLength"), prop.get("maxLength"), prop.get("pattern"))
        assert got == (field.min_length, field.max_length, field.pattern), where
    elif field.kind == "strings":
        assert (prop["type"], prop["x-kubernetes-list-type"]) == ("array", "set"), where
        assert (prop.get("minItems"), prop.get("maxItems")) == (field.min_items, field.max_items), where
        assert prop["items"].get("pattern") == field.pattern, where
    elif field.kind == "object":
        assert field.model is not None
        check_model(field.model, prop, where, seen)
    else:
        assert field.model is not None
        assert prop["x-kubernetes-list-map-keys"] == [field.map_key] and prop["maxItems"] == field.max_items
        check_model(field.model, prop["items"], where + "[]", seen)


def test_every_model_field_is_in_the_crd_with_its_bounds() -> None:
    seen: list[str] = []
    check_model(TenantSpec, spec_schema("tensorwasm.io_tenants.yaml"), "spec", seen)
    check_model(SnapshotSpec, spec_schema("tensorwasm.io_snapshots.yaml"), "spec", seen)
    assert "spec.limits.timeoutMs" in seen and "spec.kernels[].configMapRef.key" in seen and len(seen) > 25
