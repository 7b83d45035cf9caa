"""Chart values that become shard flags reach the shards: helm renders the operator's environment,
the operator's settings parser reads it, its StatefulSet builder writes the flags, and the runtime's
own parser takes them. Needs helm (the control-plane build, as tests/unit/test_alerts.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tensorwasm.dev.cluster import build_binaries
from tensorwasm.operator.desired.shards import build_shard_args
from tensorwasm.operator.settings import SettingsError, load_settings
from tensorwasm.runtime.settings import RuntimeSettings
from tensorwasm.runtime.settings import load_settings as load_runtime_settings
from tests import chart

NAMESPACE = "tw-chart"


def shard_runtime_settings(*sets: str) -> RuntimeSettings:
    """What a shard pod's runtime runs with when the chart is installed with `sets`."""
    helm = build_binaries(log=lambda _: None) / "helm"
    docs = chart.render(helm, *sets, namespace=NAMESPACE, only="templates/operator-deployment.yaml")
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    env: dict[str, Any] = {
        e["name"]: e["value"]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if "value" in e
    }
    settings = load_settings({**env, "POD_NAMESPACE": NAMESPACE})  # refuses a variable it does not read
    args = build_shard_args(settings)
    # Kubernetes fills in $(POD_*) from the Downward API.
    return load_runtime_settings(
        [a.replace("$(POD_NAMESPACE)", NAMESPACE).replace("$(POD_NAME)", "s-0") for a in args[1:]]
    )


def test_the_charts_prewarm_value_reaches_the_shards_and_defaults_to_the_runtimes_default() -> None:
    assert shard_runtime_settings().prewarm_tenants == RuntimeSettings().prewarm_tenants == 4
    assert shard_runtime_settings("shard.idle.prewarmTenants=9").prewarm_tenants == 9
    assert shard_runtime_settings("shard.idle.prewarmTenants=0").prewarm_tenants == 0  # prewarm off


def test_the_operator_refuses_a_prewarm_count_out_of_the_runtimes_range() -> None:
    with pytest.raises(SettingsError, match="SHARD_PREWARM_TENANTS must be between 0 and 10000"):
        load_settings({"TENSORWASM_OPERATOR_SHARD_PREWARM_TENANTS": "10001"})
