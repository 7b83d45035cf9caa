"""The operator's side of idle sleep: phase Asleep from a shard's report, the shard flags it sets."""

from __future__ import annotations

import pytest

from tensorwasm.api.conditions import Placement, tenant_phase
from tensorwasm.api.tenant import parse_tenant
from tensorwasm.operator.desired.shards import build_shard_args
from tensorwasm.operator.settings import SettingsError, load_settings
from tensorwasm.runtime.settings import load_settings as load_runtime_settings


def _tenant(report: dict[str, object]) -> object:
    spec = {
        "module": {"url": "https://x/m.wasm", "sha256": "b" * 64},
        "functions": ["echo"],
        "idle": {"after": "5m"},
    }
    meta = {"name": "alpha", "namespace": "tw", "uid": "u1", "generation": 1}
    return parse_tenant({"metadata": meta, "spec": spec, "status": {"runtime": report}})


def test_a_sleeping_tenant_is_phase_asleep_and_still_ready() -> None:
    report = {"shard": "shard-0", "observedGeneration": 1, "loaded": True, "reason": "Asleep",
              "message": "asleep (65544 bytes in a snapshot, disk); wakes on the first request"}  # fmt: skip
    phase, conds = tenant_phase(_tenant(report), Placement("shard-0"))  # type: ignore[arg-type]
    assert phase == "Asleep"
    ready = {c.type: c for c in conds}["Ready"]
    assert (
        ready.status == "True" and ready.reason == "Asleep" and "wakes on the first request" in ready.message
    )
    woke = {
        **report,
        "reason": "ModuleLoaded",
        "message": "serving 1 function(s); woke in 3.1 ms from the hot tier",
    }
    assert tenant_phase(_tenant(woke), Placement("shard-0"))[0] == "Ready"  # type: ignore[arg-type]


def test_shards_get_the_idle_default_and_a_resident_budget_only_when_oversubscribed() -> None:
    env = {"TENSORWASM_OPERATOR_SHARD_IDLE_AFTER": "5m", "TENSORWASM_OPERATOR_SHARD_GPU_MEMORY": "12Gi"}
    args = build_shard_args(load_settings(env))
    assert "--idle-after=5m" in args and not any(a.startswith("--resident-gpu-memory") for a in args)
    tenth = load_settings({**env, "TENSORWASM_OPERATOR_SHARD_ACTIVE_PERCENT": "10"})
    assert tenth.shard_capacity.active_fraction == 0.1 and tenth.shard_capacity.idle_by_default
    args = build_shard_args(tenth)
    assert f"--resident-gpu-memory={8 << 30}" in args  # 12 GiB slice / 1.5 fragmentation headroom
    # The runtime's own parser takes what the operator writes (POD_* are filled in by Kubernetes).
    runtime = load_runtime_settings([a.replace("$(POD_NAMESPACE)", "tw").replace("$(POD_NAME)", "s-0")
                                     for a in args[1:]])  # fmt: skip
    assert runtime.idle_after == "5m" and runtime.resident_gpu_bytes == 8 << 30
    with pytest.raises(SettingsError, match="SHARD_IDLE_AFTER"):
        load_settings({"TENSORWASM_OPERATOR_SHARD_IDLE_AFTER": "soon"})
