"""spec.idle.after has a floor (10s): a tenant cannot make its shard capture its whole state after
nearly every request. The model refuses shorter durations with a message naming the field, and the
CRD's CEL rule says the same as the model's check (the API server refuses them before any shard).
A Tenant stored before the floor existed (the field's example was "500ms") still serves after the
upgrade (review R2 G9): read from the API server its value is raised to the floor, with a note in
its status; only new or changed values are refused (the CRD rule ratchets)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tensorwasm.api.fields import InvalidSpec
from tensorwasm.api.tenant import (
    IDLE_AFTER_MIN_S,
    IDLE_AFTER_PATTERN,
    idle_seconds,
    parse_spec,
    parse_tenant,
    stored_spec_notes,
)
from tensorwasm.runtime.shard import Shard
from tensorwasm.runtime.tenancy.config import parse_kube_tenant, parse_local_tenant

ROOT = Path(__file__).resolve().parents[2]
SHA = "a" * 64
SHORT = ["1ms", "500ms", "9999ms", "1s", "9s"]
LONG_ENOUGH = ["never", "10000ms", "10s", "30s", "1m", "5m", "2h", "9999999h", "9999999ms"]


def spec(after: str) -> dict[str, object]:
    return {
        "module": {"url": "https://x/m.wasm", "sha256": SHA},
        "functions": ["echo"],
        "idle": {"after": after},
    }


@pytest.mark.parametrize("after", SHORT)
def test_an_idle_after_under_the_floor_is_refused_naming_the_field(after: str) -> None:
    with pytest.raises(InvalidSpec) as refused:
        parse_spec(spec(after))
    assert "spec.idle.after" in str(refused.value)
    assert f"at least {IDLE_AFTER_MIN_S}s" in str(refused.value)


@pytest.mark.parametrize("after", SHORT)
def test_a_stored_idle_after_under_the_floor_serves_at_the_floor_with_a_note(after: str) -> None:
    # Stored before the floor: the operator and the shards read it from the API server.
    assert parse_spec(spec(after), from_api_server=True).idle.after == f"{IDLE_AFTER_MIN_S}s"
    body = {"metadata": {"name": "t", "namespace": "ns", "uid": f"u-{after}"}, "spec": spec(after)}
    assert parse_tenant(body).spec_error is None  # the operator keeps it placed
    (note,) = stored_spec_notes(spec(after))
    assert f"spec.idle.after {after!r} is under the {IDLE_AFTER_MIN_S}s floor" in note
    config = parse_kube_tenant(body, token="tok-12345678", module_data=None)
    assert config.idle_after == f"{IDLE_AFTER_MIN_S}s" and config.notes == (note,)
    # max(after, floor): what the shard's idle scan waits
    assert Shard(None, None, None).idle_after(config) == IDLE_AFTER_MIN_S  # type: ignore[arg-type]
    assert stored_spec_notes(spec("10s")) == () and stored_spec_notes(spec("never")) == ()


def test_the_tenants_file_still_refuses_an_idle_after_under_the_floor(tmp_path: Path) -> None:
    entry = {"name": "alpha", "token": "s3cret-alpha", "functions": ["echo"],
             "module": {"path": "echo.wat", "sha256": SHA}, "idle": {"after": "500ms"}}  # fmt: skip
    with pytest.raises(InvalidSpec, match=r"tenants\[0\]\.idle\.after: .*at least 10s"):
        parse_local_tenant(entry, "tenants[0]", tmp_path)


@pytest.mark.parametrize("after", LONG_ENOUGH)
def test_an_idle_after_at_or_over_the_floor_is_accepted(after: str) -> None:
    assert parse_spec(spec(after)).idle.after == after


def crd_rule() -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "crds/tensorwasm.io_tenants.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    after = schema["properties"]["spec"]["properties"]["idle"]["properties"]["after"]
    assert after["pattern"] == IDLE_AFTER_PATTERN
    (rule,) = after["x-kubernetes-validations"]
    return dict(rule)


def test_the_crd_rule_refuses_exactly_what_the_model_refuses() -> None:
    rule = crd_rule()
    assert f"at least {IDLE_AFTER_MIN_S}s" in rule["message"]
    found = re.fullmatch(r"self\.matches\('([^']+)'\)", rule["rule"])
    assert found is not None, rule["rule"]
    floor = re.compile(found.group(1))  # RE2 and Python's re agree on this plain regex
    durations = [
        f"{n}{unit}" for unit in ("ms", "s", "m", "h") for n in (1, 9, 10, 59, 999, 9999, 10000, 9999999)
    ]
    for after in [*durations, *SHORT, *LONG_ENOUGH]:
        assert re.fullmatch(IDLE_AFTER_PATTERN, after), after
        seconds = idle_seconds(after)
        model_ok = seconds is None or seconds >= IDLE_AFTER_MIN_S
        assert bool(floor.search(after)) == model_ok, after
