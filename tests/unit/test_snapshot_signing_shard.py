"""The operator passes snapshot signing to its shards: the mode and the key Secret, mounted read-only
as a volume (rotation without a restart), parsed by the runtime's own parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorwasm.operator import settings as operator_settings
from tensorwasm.operator.desired.shards import SIGNING_KEYS_DIR, build_shard_statefulset
from tensorwasm.operator.settings import SettingsError, load_settings
from tensorwasm.runtime import settings as runtime_settings
from tensorwasm.runtime.settings import load_settings as load_runtime_settings


def _shard(env: dict[str, str]) -> tuple[dict[str, object], runtime_settings.RuntimeSettings]:
    pod = build_shard_statefulset(load_settings(env), 1)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = [a.replace("$(POD_NAME)", "s-0").replace("$(POD_NAMESPACE)", "tw") for a in container["args"]]
    return pod, load_runtime_settings(args[1:], environ={})


def test_the_signing_secret_is_mounted_and_named_to_the_runtime() -> None:
    pod, rt = _shard({
        "TENSORWASM_OPERATOR_SHARD_SNAPSHOT_SIGNING": "require",
        "TENSORWASM_OPERATOR_SHARD_SNAPSHOT_SIGNING_SECRET": "tw-snapshot-keys",
    })  # fmt: skip
    assert (rt.snapshot_signing, rt.snapshot_signing_keys) == ("require", Path(SIGNING_KEYS_DIR))
    volume = next(v for v in pod["volumes"] if v["name"] == "snapshot-keys")  # type: ignore[attr-defined]
    assert volume["secret"] == {"secretName": "tw-snapshot-keys", "defaultMode": 0o440}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "snapshot-keys")  # type: ignore[index]
    assert mount == {"name": "snapshot-keys", "mountPath": SIGNING_KEYS_DIR, "readOnly": True}


def test_without_a_secret_shards_verify_if_present_and_mount_nothing() -> None:
    pod, rt = _shard({})
    assert (rt.snapshot_signing, rt.snapshot_signing_keys) == ("verify-if-present", None)
    assert all(v["name"] != "snapshot-keys" for v in pod["volumes"])  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TENSORWASM_OPERATOR_SHARD_SNAPSHOT_SIGNING": "always"}, "must be one of require"),
        (
            {"TENSORWASM_OPERATOR_SHARD_SNAPSHOT_SIGNING": "require"},
            "needs TENSORWASM_OPERATOR_SHARD_SNAPSHOT_SIGNING_SECRET",
        ),
    ],
)
def test_the_operator_refuses_a_signing_setting_its_shards_could_not_run(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(env)


def test_operator_and_runtime_know_the_same_modes() -> None:
    assert operator_settings.SNAPSHOT_SIGNING_MODES == runtime_settings.SNAPSHOT_SIGNING_MODES
