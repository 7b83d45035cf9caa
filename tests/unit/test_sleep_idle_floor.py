"""spec.idle.after has a floor (10s): a tenant cannot make its shard capture its whole state after
nearly every request. The model refuses shorter durations with a message naming the field, and the
CRD's CEL rule says the same as the model's check (the API server refuses them before any shard)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tensorwasm.api.fields import InvalidSpec
from tensorwasm.api.tenant import IDLE_AFTER_MIN_S, IDLE_AFTER_PATTERN, idle_seconds, parse_spec

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
    with pytest.raises(InvalidSpec):
        parse_spec(spec(after), from_api_server=True)  # a shard refuses it too (a CRD without the rule)


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
