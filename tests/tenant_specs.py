"""Random Tenant specs for the cross-entry-point property tests (unit and cluster).

The values sit on and around every declared bound, read from the spec model itself, so a limit
added to `Limits` is covered without touching this file. A quarter of the specs are valid, half
are valid but for one field on or around a bound, a quarter are anything.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tensorwasm.api.fields import Field, fields_of
from tensorwasm.api.quantity import format_quantity
from tensorwasm.api.tenant import GpuShare, Limits, PlacementHints, SnapshotPolicy

SHA = "a" * 64
ABSENT = object()  # leave the field out


def _around(spec: Field) -> st.SearchStrategy[Any]:
    """Integers at, just inside and just outside the field's bounds, plus a few wrong types."""
    edges: list[int] = []
    for bound in (spec.minimum, spec.maximum):
        if bound is not None:
            edges += [bound - 1, bound, bound + 1]
    lo = spec.minimum if spec.minimum is not None else 0
    hi = spec.maximum if spec.maximum is not None else lo + 1000
    values = st.one_of(st.sampled_from(edges or [0]), st.integers(lo, hi))
    if spec.kind == "quantity":
        # The same numbers spelled as quantities, exact ("64Mi") or not ("1.5", "lots").
        spelled = values.map(lambda v: format_quantity(v) if v >= 0 else str(v))
        return st.one_of(values, spelled, st.sampled_from(["lots", "1.5", "1.5Ki", "0.5Ki", "1e3", "+64Mi"]))
    return st.one_of(values, st.sampled_from(["4", 1.5, True]))


def _strings(spec: Field) -> st.SearchStrategy[Any]:
    if spec.enum:
        return st.sampled_from([*spec.enum, spec.enum[0].lower(), "Sometimes"])
    return st.sampled_from(["x", "snap-1", "", "y" * 254])


def _valid(spec: Field) -> st.SearchStrategy[Any]:
    """A value the field accepts: within its bounds, as an integer or an exact quantity."""
    if spec.kind == "string":
        return st.sampled_from(spec.enum or ("x",))
    lo = spec.minimum if spec.minimum is not None else 0
    hi = spec.maximum if spec.maximum is not None else lo + 1000
    values = st.integers(lo, hi)
    return st.one_of(values, values.map(format_quantity)) if spec.kind == "quantity" else values


def model_values(model: type, valid: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    """An object of `model`'s scalar fields, each absent, valid, or (unless `valid`) on/around its bounds."""
    parts = {}
    for _, spec in fields_of(model):
        wild = _around(spec) if spec.kind in ("integer", "quantity") else _strings(spec)
        parts[spec.name] = st.one_of(st.just(ABSENT), _valid(spec), *(() if valid else (wild,)))
    return st.fixed_dictionaries(parts).map(lambda d: {k: v for k, v in d.items() if v is not ABSENT})


def _field_values(model: type) -> st.SearchStrategy[tuple[str, Any]]:
    """(field name, a value on or around its bounds) for one scalar field of `model`."""
    return st.sampled_from([f for _, f in fields_of(model)]).flatmap(
        lambda f: st.tuples(st.just(f.name), _around(f) if f.kind in ("integer", "quantity") else _strings(f))
    )


def _module() -> st.SearchStrategy[dict[str, Any]]:
    url = st.sampled_from(["https://modules.example/m.wasm", "http://10.0.0.1:8080/m", "ftp://x/m", "m.wasm"])
    cm = st.sampled_from([{"name": "m"}, {"name": "m", "key": "k.wasm"}, {"name": ""}, {}])
    sha = st.sampled_from([SHA, "A" * 64, "a" * 63])
    return st.fixed_dictionaries({}, optional={"url": url, "configMapRef": cm, "sha256": sha}).filter(
        lambda m: "sha256" in m or len(m) % 2 == 0
    )  # mostly with a sha256


def _kernels() -> st.SearchStrategy[list[dict[str, Any]]]:
    kernel = st.fixed_dictionaries(
        {"name": st.sampled_from(["vec_add", "scale", "1bad"]),
         "configMapRef": st.sampled_from([{"name": "ptx"}, {"name": "ptx", "key": "add.ptx"}])}
    )  # fmt: skip
    return st.lists(kernel, max_size=2)


SECTIONS = {"limits": Limits, "gpu": GpuShare, "snapshot": SnapshotPolicy, "placement": PlacementHints}


def valid_specs() -> st.SearchStrategy[dict[str, Any]]:
    module = st.sampled_from(
        [
            {"url": "https://modules.example/m.wasm", "sha256": SHA},
            {"configMapRef": {"name": "m"}, "sha256": SHA},
        ]
    )
    functions = st.lists(st.sampled_from(["echo", "f_1", "a.b", "x-y"]), min_size=1, max_size=3, unique=True)
    optional = {name: model_values(model, valid=True) for name, model in SECTIONS.items()}
    return st.fixed_dictionaries({"module": module, "functions": functions}, optional=optional).map(
        _periodic_ok
    )


def _periodic_ok(spec: dict[str, Any]) -> dict[str, Any]:
    snapshot = spec.get("snapshot") or {}
    if snapshot.get("policy") == "Periodic" and "intervalSeconds" not in snapshot:
        spec["snapshot"] = {**snapshot, "intervalSeconds": 60}
    return spec


def one_field_off(spec: dict[str, Any], section: str, change: tuple[str, Any]) -> dict[str, Any]:
    """`spec` with one field of one section set to a value on or around its bounds."""
    return {**spec, section: {**(spec.get(section) or {}), change[0]: change[1]}}


def tenant_specs() -> st.SearchStrategy[dict[str, Any]]:
    """Valid specs, valid specs with one field on/around a bound (the verdict hangs on that field),
    and wild specs (anything, mostly refused)."""
    edited = st.tuples(valid_specs(), st.sampled_from(sorted(SECTIONS))).flatmap(
        lambda pair: _field_values(SECTIONS[pair[1]]).map(
            lambda change: one_field_off(pair[0], pair[1], change)
        )
    )
    return st.one_of(valid_specs(), edited, edited, wild_specs())


def wild_specs() -> st.SearchStrategy[dict[str, Any]]:
    functions = st.lists(st.sampled_from(["echo", "f_1", "a.b", "1bad", "x-y"]), min_size=0, max_size=3)
    optional = {
        "limits": st.one_of(model_values(Limits), st.just({"cpu": 1})),
        "gpu": model_values(GpuShare),
        "snapshot": model_values(SnapshotPolicy),
        "placement": model_values(PlacementHints),
        "kernels": _kernels(),
        "restoreFrom": st.sampled_from(["snap-1", "y" * 254]),
        "authSecretRef": st.sampled_from([{"name": "mine"}, {"name": ""}]),
    }
    required = {"module": _module(), "functions": functions}
    return st.fixed_dictionaries(required, optional=optional)
