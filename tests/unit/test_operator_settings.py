"""Operator settings: bad input fails fast with a message naming the variable."""

from __future__ import annotations

import pytest

from tensorwasm.operator.settings import SettingsError, load_settings


def test_settings_from_env() -> None:
    s = load_settings(
        {
            "TENSORWASM_OPERATOR_NAMESPACE": "tw",
            "TENSORWASM_OPERATOR_SHARDS": "3",
            "TENSORWASM_OPERATOR_SHARD_GPU_MEMORY": "8Gi",
            "TENSORWASM_OPERATOR_SHARD_TOLERATIONS": '[{"operator": "Exists"}]',
        }
    )
    assert (s.namespace, s.shards, s.shard_capacity.gpu_memory_bytes) == ("tw", 3, 8 << 30)
    assert s.shard_tolerations == ({"operator": "Exists"},)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TENSORWASM_OPERATOR_SHARDS": "two"}, "TENSORWASM_OPERATOR_SHARDS must be an integer"),
        ({"TENSORWASM_OPERATOR_SHARDS": "0"}, "TENSORWASM_OPERATOR_SHARDS must be between 1"),
        ({"TENSORWASM_OPERATOR_SHARD_GPU_MEMORY": "big"}, "SHARD_GPU_MEMORY must be a quantity"),
        ({"TENSORWASM_OPERATOR_STANDALONE": "maybe"}, "STANDALONE must be true or false"),
        ({"TENSORWASM_OPERATOR_SHARD_NODE_SELECTOR": "[1]"}, "must be a JSON dict"),
        ({"TENSORWASM_OPERATOR_LOG_LEVEL": "loud"}, "LOG_LEVEL must be"),
        ({"TENSORWASM_OPERATOR_SHARD_MPS_PIPE_DIR": "mps"}, "SHARD_MPS_PIPE_DIR must be an absolute path"),
    ],
)
def test_bad_settings_fail_fast(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(env)


def test_liveness_endpoint_is_off_unless_a_port_is_set() -> None:
    assert load_settings({}).liveness_endpoint is None
    s = load_settings({"TENSORWASM_OPERATOR_LIVENESS_PORT": "8081"})
    assert s.liveness_endpoint == "http://0.0.0.0:8081/healthz"


def test_an_unknown_variable_fails_fast() -> None:
    with pytest.raises(SettingsError, match=r"unknown variable.*TENSORWASM_OPERATOR_SHARDZ"):
        load_settings({"TENSORWASM_OPERATOR_SHARDZ": "3", "OTHER": "x"})
