"""Declarative spec fields: one declaration per field gives its type, default, bounds and CRD schema.

A spec model is a frozen dataclass whose fields are declared with `integer`, `quantity`, `string`,
`strings`, `nested` or `nested_list`. From that one declaration `parse_model` turns a JSON mapping
into the dataclass (defaults applied, every bound checked, errors naming the field path) and
`openapi_schema` writes the CRD's openAPIV3Schema, with CEL rules (plain messages) for what
OpenAPI cannot say, such as bounds on byte quantities. A model may add object-level `RULES`
(a CEL rule plus the same check in Python). Pure; imports only tensorwasm.api.quantity.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from tensorwasm.api.quantity import QUANTITY_PATTERN, format_quantity, quantity_bytes

META = "tensorwasm.api"  # key of a field's `Field` in its dataclass metadata
# Longest quantity string: bounds what the API server estimates a CEL rule on it may cost.
QUANTITY_MAX_LENGTH = 64
# QUANTITY_PATTERN without backslashes (a CEL string literal would need them doubled).
CEL_QUANTITY_PATTERN = QUANTITY_PATTERN.replace(r"(\+)?", "[+]?").replace(r"\.", "[.]")
assert "\\" not in CEL_QUANTITY_PATTERN
T = TypeVar("T")


class InvalidSpec(ValueError):
    """A spec cannot be served as written; the message names the field and says why."""

    reason = "InvalidSpec"


@dataclass(frozen=True)
class Rule:
    """A CEL rule for the CRD and the same check in Python (None: CEL only, e.g. transition rules).

    `check` receives the JSON value the rule's `self` is (defaults applied) and returns True when valid.
    """

    cel: str
    message: str
    check: Callable[[Any], bool] | None = None
    field_path: str | None = None


@dataclass(frozen=True)
class Field:
    """The schema of one field; `kind` is integer, quantity, string, strings, object or objects."""

    name: str  # the JSON name
    kind: str
    description: str
    required: bool = False
    default: Any = None  # the JSON default the CRD declares (None: none)
    minimum: int | None = None
    maximum: int | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    enum: tuple[str, ...] = ()
    min_items: int | None = None
    max_items: int | None = None
    model: type | None = None  # objects: the nested dataclass
    map_key: str | None = None  # objects: the key that makes list items unique
    rules: tuple[Rule, ...] = ()


def _declare(
    spec: Field, python_default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING
) -> Any:
    if spec.required:
        return dataclasses.field(metadata={META: spec})
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={META: spec})
    return dataclasses.field(default=python_default, metadata={META: spec})


def integer(
    name: str, description: str, *, default: int | None = None, minimum: int | None = None,
    maximum: int | None = None, required: bool = False,
) -> Any:  # fmt: skip
    """An integer; absent means `default` (None: no value)."""
    spec = Field(name, "integer", description, required, default, minimum, maximum)
    return _declare(spec, default)


def quantity(name: str, description: str, *, default: str | None = None, minimum: int, maximum: int) -> Any:
    """Bytes written as an integer or a Kubernetes quantity ("64Mi"); parsed to whole bytes."""
    spec = Field(
        name,
        "quantity",
        description,
        False,
        default,
        minimum,
        maximum,
        max_length=QUANTITY_MAX_LENGTH,
        rules=(_bytes_rule(name, minimum, maximum),),
    )
    return _declare(spec, None if default is None else quantity_bytes(default))


def string(
    name: str, description: str, *, default: str | None = None, required: bool = False,
    min_length: int | None = None, max_length: int | None = None, pattern: str | None = None,
    enum: tuple[str, ...] = (), rules: tuple[Rule, ...] = (),
) -> Any:  # fmt: skip
    spec = Field(
        name, "string", description, required, default, min_length=min_length, max_length=max_length,
        pattern=pattern, enum=enum, rules=rules,
    )  # fmt: skip
    return _declare(spec, default)


def strings(
    name: str, description: str, *, required: bool = False, min_items: int | None = None,
    max_items: int | None = None, max_length: int | None = None, pattern: str | None = None,
) -> Any:  # fmt: skip
    """A list of distinct strings (a set), parsed to a tuple."""
    spec = Field(
        name, "strings", description, required, min_items=min_items, max_items=max_items,
        min_length=1, max_length=max_length, pattern=pattern,
    )  # fmt: skip
    return _declare(spec, ())


def nested(
    name: str, model: type[T], description: str, *, required: bool = False, default_empty: bool = False
) -> Any:
    """An object; `default_empty`: absent means `{}` with the model's defaults, else None."""
    spec = Field(name, "object", description, required, {} if default_empty else None, model=model)
    return _declare(spec, None) if not default_empty else _declare(spec, factory=model)


def nested_list(name: str, model: type[T], description: str, *, map_key: str, max_items: int) -> Any:
    """A list of objects, unique by `map_key`."""
    spec = Field(name, "objects", description, max_items=max_items, model=model, map_key=map_key)
    return _declare(spec, ())


def _bytes_rule(name: str, minimum: int, maximum: int) -> Rule:
    # string(self): the field is int-or-string; quantity() reads both spellings the same way.
    # Whole bytes without isInteger(), which the API server answers false for exact spellings such as
    # "1.5Ki" or "1023Ti": within the bounds (at most 2^53) a double holds every whole number exactly.
    assert maximum <= 1 << 53, "quantity bounds past 2^53 bytes need another whole-number test"
    # The spelling check lives here, not in an OpenAPI `pattern`: a pattern's error shows the regex,
    # this rule's shows its message. An integer (-5) goes through string(self) and the same checks.
    q = "quantity(string(self))"
    lo, hi = format_quantity(minimum), format_quantity(maximum)
    cel = (
        f"string(self).matches('{CEL_QUANTITY_PATTERN}') && "
        f"isQuantity(string(self)) && {q}.compareTo(quantity('{lo}')) >= 0 && "
        f"{q}.compareTo(quantity('{hi}')) <= 0 && "
        f"double(int({q}.asApproximateFloat())) == {q}.asApproximateFloat()"
    )
    return Rule(cel, f"{name} must be a whole number of bytes from {lo} to {hi}, e.g. 256Mi or 1048576")


def fields_of(model: type) -> list[tuple[str, Field]]:
    """(attribute, Field) for each declared field of a spec model, in declaration order."""
    return [(f.name, f.metadata[META]) for f in dataclasses.fields(model) if META in f.metadata]


# --- parse ---------------------------------------------------------------------------------------


def parse_model(model: type[T], raw: object, path: str, *, ignore_unknown: bool = False) -> T:
    """`raw` as `model`; raises InvalidSpec("<path>.<field>: why") for the first field that is wrong.

    `ignore_unknown` is for objects the API server has already checked against the installed CRD:
    a field this code does not know then comes from a newer CRD (an upgrade in progress: the CRD is
    applied before the shards roll), and refusing it would take every tenant down mid-upgrade.
    Files and CLI input keep refusing unknown fields (they are typos).
    """
    if not isinstance(raw, Mapping):
        raise InvalidSpec(f"{path}: must be an object, got {_shown(raw)}")
    declared = fields_of(model)
    unknown = sorted(set(raw) - {f.name for _, f in declared})
    if unknown and not ignore_unknown:
        raise InvalidSpec(f"{path}: unknown field(s) {', '.join(map(str, unknown))}")
    values: dict[str, Any] = {}
    for attribute, spec in declared:
        where = f"{path}.{spec.name}"
        if spec.name not in raw or raw[spec.name] is None:
            if spec.required:
                raise InvalidSpec(f"{where}: is required")
            if spec.default is not None:
                values[attribute] = _parse(spec, spec.default, where, ignore_unknown)
            continue
        values[attribute] = _parse(spec, raw[spec.name], where, ignore_unknown)
    for rule in getattr(model, "RULES", ()):
        if rule.check is not None and not rule.check(with_defaults(model, raw)):
            where = f"{path}{rule.field_path or ''}"
            raise InvalidSpec(f"{where}: {rule.message}")
    return model(**values)


def with_defaults(model: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object as the API server stores it: declared defaults filled in where absent."""
    out = dict(raw)
    for _, spec in fields_of(model):
        if spec.name not in out and spec.default is not None:
            out[spec.name] = spec.default
    return out


def _parse(spec: Field, value: Any, where: str, ignore_unknown: bool = False) -> Any:
    parsed: Any
    if spec.kind == "integer":
        parsed = _integer(spec, value, where)
    elif spec.kind == "quantity":
        if isinstance(value, str) and spec.max_length is not None and len(value) > spec.max_length:
            raise InvalidSpec(f"{where}: must have at most {spec.max_length} characters, got {len(value)}")
        try:
            parsed = quantity_bytes(value)
        except ValueError as exc:
            raise InvalidSpec(f"{where}: {exc}") from None
        _bounds(spec, parsed, where, " bytes")
    elif spec.kind == "string":
        parsed = _string(spec, value, where)
    elif spec.kind == "strings":
        parsed = _strings(spec, value, where)
    elif spec.kind == "object":
        assert spec.model is not None
        parsed = parse_model(spec.model, value, where, ignore_unknown=ignore_unknown)
    else:
        parsed = _objects(spec, value, where, ignore_unknown)
    for rule in spec.rules:
        if rule.check is not None and not rule.check(value):
            raise InvalidSpec(f"{where}: {rule.message}")
    return parsed


def _integer(spec: Field, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(f"{where}: must be an integer, got {_shown(value)}")
    _bounds(spec, value, where, "")
    return value


def _bounds(spec: Field, value: int, where: str, unit: str) -> None:
    if spec.minimum is not None and value < spec.minimum:
        raise InvalidSpec(f"{where}: must be at least {_shown_bound(spec.minimum, unit)}, got {value}{unit}")
    if spec.maximum is not None and value > spec.maximum:
        raise InvalidSpec(f"{where}: must be at most {_shown_bound(spec.maximum, unit)}, got {value}{unit}")


def _shown_bound(bound: int, unit: str) -> str:
    return f"{format_quantity(bound)} ({bound} bytes)" if unit and bound > 1023 else f"{bound}{unit}"


def _string(spec: Field, value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidSpec(f"{where}: must be a string, got {_shown(value)}")
    if spec.min_length is not None and len(value) < spec.min_length:
        raise InvalidSpec(f"{where}: must have at least {spec.min_length} character(s)")
    if spec.max_length is not None and len(value) > spec.max_length:
        raise InvalidSpec(f"{where}: must have at most {spec.max_length} characters, got {len(value)}")
    if spec.pattern is not None and not matches(spec.pattern, value):
        raise InvalidSpec(f"{where}: {value!r} does not match {spec.pattern}")
    if spec.enum and value not in spec.enum:
        raise InvalidSpec(f"{where}: must be one of {', '.join(spec.enum)}, got {value!r}")
    return value


def matches(pattern: str, value: str) -> bool:
    """`pattern` as the API server applies it (Go's `$` is the end of text; Python's allows a newline)."""
    return (
        re.search(pattern.removesuffix("$") + r"\Z" if pattern.endswith("$") else pattern, value) is not None
    )


def _strings(spec: Field, value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InvalidSpec(f"{where}: must be a list, got {_shown(value)}")
    _items(spec, value, where)
    items = tuple(_string(spec, v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(set(items)) != len(items):
        raise InvalidSpec(f"{where}: lists a value twice")
    return items


def _objects(spec: Field, value: Any, where: str, ignore_unknown: bool = False) -> tuple[Any, ...]:
    assert spec.model is not None and spec.map_key is not None
    if not isinstance(value, list):
        raise InvalidSpec(f"{where}: must be a list, got {_shown(value)}")
    _items(spec, value, where)
    items: tuple[Any, ...] = tuple(
        parse_model(spec.model, v, f"{where}[{i}]", ignore_unknown=ignore_unknown)
        for i, v in enumerate(value)
    )
    keys = [v.get(spec.map_key) for v in value]
    if len(set(keys)) != len(keys):
        raise InvalidSpec(f"{where}: lists {spec.map_key} twice")
    return items


def _items(spec: Field, value: list[Any], where: str) -> None:
    if spec.min_items is not None and len(value) < spec.min_items:
        raise InvalidSpec(f"{where}: must have at least {spec.min_items} item(s)")
    if spec.max_items is not None and len(value) > spec.max_items:
        raise InvalidSpec(f"{where}: must have at most {spec.max_items} items, got {len(value)}")


def _shown(value: object) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]


# --- CRD schema ----------------------------------------------------------------------------------


def openapi_schema(model: type, description: str) -> dict[str, Any]:
    """The openAPIV3Schema of an object holding `model`'s fields (structural, with CEL rules)."""
    properties = {spec.name: _property(spec) for _, spec in fields_of(model)}
    schema: dict[str, Any] = {"type": "object", "description": description}
    required = [spec.name for _, spec in fields_of(model) if spec.required]
    if required:
        schema["required"] = required
    rules = [_cel(r) for r in getattr(model, "RULES", ())]
    if rules:
        schema["x-kubernetes-validations"] = rules
    schema["properties"] = properties
    return schema


def _cel(rule: Rule) -> dict[str, str]:
    out = {"rule": rule.cel, "message": rule.message}
    if rule.field_path:
        out["fieldPath"] = rule.field_path
    return out


def _property(spec: Field) -> dict[str, Any]:
    out: dict[str, Any]
    if spec.kind == "object":
        assert spec.model is not None
        out = openapi_schema(spec.model, spec.description)
    elif spec.kind == "objects":
        assert spec.model is not None and spec.map_key is not None
        out = {"type": "array", "description": spec.description, "maxItems": spec.max_items}
        out |= {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [spec.map_key]}
        out["items"] = openapi_schema(spec.model, spec.model.__doc__ or "")
    elif spec.kind == "strings":
        out = {"type": "array", "description": spec.description}
        out |= _drop_none({"minItems": spec.min_items, "maxItems": spec.max_items})
        out["x-kubernetes-list-type"] = "set"
        item = {"type": "string", "minLength": spec.min_length, "maxLength": spec.max_length}
        out["items"] = _drop_none({**item, "pattern": spec.pattern})
    elif spec.kind == "quantity":
        out = {"description": spec.description, "anyOf": [{"type": "integer"}, {"type": "string"}]}
        out |= {"x-kubernetes-int-or-string": True, "maxLength": spec.max_length}
    elif spec.kind == "integer":
        out = {"type": "integer", "description": spec.description}
        out |= _drop_none({"minimum": spec.minimum, "maximum": spec.maximum})
    else:
        out = {"type": "string", "description": spec.description}
        out |= _drop_none(
            {"minLength": spec.min_length, "maxLength": spec.max_length, "pattern": spec.pattern}
        )
        if spec.enum:
            out["enum"] = list(spec.enum)
    if spec.default is not None:
        out["default"] = spec.default
    if spec.rules:
        out["x-kubernetes-validations"] = [*out.get("x-kubernetes-validations", []), *map(_cel, spec.rules)]
    return out


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
