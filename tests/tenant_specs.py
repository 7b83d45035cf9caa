"""Random Tenant specs for the cross-entry-point property tests (unit and cluster).

The values sit on and around every declared bound, read from the spec model itself, so a limit
added to `Limits` is covered without touching this file. About half the specs are valid.
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


def model_values(model: type) -> st.SearchStrategy[dict[str, Any]]:
    """An object of `model`'s scalar fields, each absent or on/around its bounds."""
    parts = {}
    for _, spec in fields_of(model):
        value = _around(spec) if spec.kind in ("integer", "quantity") else _strings(spec)
        parts[spec.name] = st.one_of(st.just(ABSENT), value)
    return st.fixed_dictionaries(parts).map(lambda d: {k: v for k, v in d.items() if v is not ABSENT})


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


def tenant_specs() -> st.SearchStrategy[dict[str, Any]]:
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
