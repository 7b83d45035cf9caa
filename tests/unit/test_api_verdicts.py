"""One verdict per Tenant spec: every reader of a spec accepts exactly the specs the others accept.

The operator's parse, the shard's parse (Kubernetes and local-file sources) and the planner's
admission all go through tensorwasm.api.tenant; this keeps it that way if someone adds a check to
one of them. tests/cluster/test_api_verdicts.py adds the API server's own verdict (CRD schema + CEL).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from tensorwasm.api.fields import InvalidSpec
from tensorwasm.api.tenant import parse_spec, parse_tenant
from tensorwasm.planner.admission import admit_spec
from tensorwasm.runtime.tenancy.config import parse_kube_tenant, parse_local_tenant
from tests.tenant_specs import SHA, tenant_specs


def accepts(check: Any) -> bool:
    try:
        check()
    except InvalidSpec:
        return False
    return True


def verdicts(spec: dict[str, Any]) -> dict[str, bool]:
    body = {"metadata": {"name": "alpha", "namespace": "ns", "uid": "u", "generation": 1}, "spec": spec}
    has_cm = isinstance(spec.get("module"), dict) and "configMapRef" in spec["module"]
    return {
        "operator": parse_tenant(body).spec_error is None,
        "runtime": accepts(
            lambda: parse_kube_tenant(body, token="t" * 12, module_data=b"\0asm" if has_cm else None)
        ),
        "planner": accepts(lambda: admit_spec(spec)),
    }


# derandomize: the same examples every run (deterministic on a busy machine); no health checks timed.
CHECKS = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


@settings(CHECKS, max_examples=200)
@given(tenant_specs())
def test_operator_runtime_and_planner_agree_on_every_spec(spec: dict[str, Any]) -> None:
    seen = verdicts(spec)
    assert len(set(seen.values())) == 1, (seen, spec)


@settings(CHECKS, max_examples=100)
@given(tenant_specs())
def test_the_local_tenants_file_reads_limits_and_gpu_as_a_tenant_does(spec: dict[str, Any]) -> None:
    parts = {k: spec[k] for k in ("limits", "gpu") if k in spec}
    entry = {"name": "alpha", "token": "t" * 12, "module": {"url": "https://x/m", "sha256": SHA}, **parts}
    as_tenant = {"module": {"url": "https://x/m", "sha256": SHA}, "functions": ["f"], **parts}
    local = accepts(lambda: parse_local_tenant(entry, "tenants[0]", Path("/nonexistent")))
    assert local == accepts(lambda: parse_spec(as_tenant)), spec


def test_the_generator_reaches_both_verdicts() -> None:
    # A property test whose specs were all valid (or all invalid) would prove nothing.
    seen: set[bool] = set()

    @settings(CHECKS, max_examples=100)
    @given(tenant_specs())
    def collect(spec: dict[str, Any]) -> None:
        seen.add(accepts(lambda: parse_spec(spec)))

    collect()
    assert seen == {True, False}


def test_a_field_from_a_newer_crd_is_ignored_in_api_objects_and_refused_in_files() -> None:
    """Mid-upgrade the CRD is new and the shards old: defaults the new CRD adds must not take
    tenants down; in a file or on the command line an unknown field is a typo."""
    spec = {
        "module": {"url": "https://example.com/m.wasm", "sha256": "0" * 64},
        "functions": ["f"],
        "limits": {"newerLimit": 5},
    }
    tenant = parse_tenant({"metadata": {"name": "a"}, "spec": spec})
    assert tenant.spec is not None and tenant.spec_error is None
    with pytest.raises(InvalidSpec, match="unknown field"):
        parse_spec(spec)
