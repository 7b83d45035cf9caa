"""TenantConfig from both sources: the file's own fields, the spec model's limits, a clear error for each."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorwasm.api.fields import InvalidSpec
from tensorwasm.api.tenant import Limits
from tensorwasm.runtime.tenancy.config import parse_kube_tenant, parse_local_tenant

SHA = "a" * 64


def local(**over: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "name": "alpha",
        "token": "s3cret-alpha",
        "module": {"path": "echo.wat", "sha256": SHA},
        "functions": ["echo"],
    }
    entry.update(over)
    return entry


def test_local_entry_with_defaults_and_relative_path(tmp_path: Path) -> None:
    cfg = parse_local_tenant(local(), "tenants[0]", tmp_path)
    assert cfg.name == "alpha" and cfg.functions == ("echo",)
    assert cfg.module.path == tmp_path / "echo.wat" and cfg.module.sha256 == SHA
    assert cfg.limits == Limits()
    assert cfg.limits.linear_memory_bytes == 64 << 20 and cfg.limits.max_body_bytes == 1 << 20


def test_local_limits_and_token_file(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("from-a-file-123\n")
    entry = local(
        tokenFile="tok",
        limits={"gpuMemory": "64Mi", "linearMemory": "16Mi", "timeoutMs": 500, "maxConcurrency": 2,
                "queueLength": 8, "maxBodyBytes": "64Ki"},
    )  # fmt: skip
    del entry["token"]
    cfg = parse_local_tenant(entry, "tenants[0]", tmp_path)
    assert cfg.token == "from-a-file-123"
    assert cfg.limits == Limits(
        gpu_memory_bytes=64 << 20, linear_memory_bytes=16 << 20, timeout_ms=500, max_concurrency=2,
        queue_length=8, max_body_bytes=64 << 10,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"name": "Alpha_1"}, r"tenants\[0\]\.name: 'Alpha_1' must be a DNS label"),
        ({"token": "short"}, r"tenants\[0\]: a token needs at least 8 characters"),
        ({"token": "t" * 4097}, r"tenants\[0\]: a token has at most 4096 characters, this one 4097"),
        ({"tokenFile": "x"}, r"tenants\[0\]: set exactly one of token or tokenFile"),
        ({"module": {"sha256": SHA}}, r"tenants\[0\]\.module: set exactly one of path or url"),
        (
            {"module": {"path": "a", "sha256": "ABC"}},
            r"tenants\[0\]\.module\.sha256: 'ABC' does not match",
        ),
        (
            {"module": {"url": "ftp://x/m.wasm", "sha256": SHA}},
            r"module\.url: must be an absolute http:// or https:// URL",
        ),
        ({"functions": ["echo", "echo"]}, r"tenants\[0\]\.functions: lists a function twice"),
        ({"functions": "echo"}, r"tenants\[0\]\.functions: expected a list"),
        ({"limits": {"timeoutMs": 0}}, r"tenants\[0\]\.limits\.timeoutMs: must be at least 1, got 0"),
        ({"limits": {"maxConcurrency": "4"}}, r"limits\.maxConcurrency: must be an integer"),
        ({"limits": {"linearMemory": "1Ki"}}, r"limits\.linearMemory: must be at least 64Ki"),
        ({"limits": {"gpuMemory": 0}}, r"limits\.gpuMemory: must be at least 1 bytes"),
        ({"limits": {"cpu": 1}}, r"limits: unknown field\(s\) cpu"),
        ({"colour": "blue"}, r"tenants\[0\]: unknown field\(s\) colour"),
    ],
)
def test_local_errors_name_the_field(tmp_path: Path, over: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        parse_local_tenant(local(**over), "tenants[0]", tmp_path)


def test_unreadable_token_file(tmp_path: Path) -> None:
    entry = {k: v for k, v in local(tokenFile="missing").items() if k != "token"}
    with pytest.raises(InvalidSpec, match=r"tenants\[0\]\.tokenFile: cannot read"):
        parse_local_tenant(entry, "tenants[0]", tmp_path)


def kube(spec: dict[str, object]) -> dict[str, object]:
    return {"metadata": {"name": "alpha", "namespace": "team-a", "generation": 3}, "spec": spec}


def test_kube_tenant_with_resolved_configmap() -> None:
    obj = kube({"module": {"configMapRef": {"name": "m", "key": "module.wasm"}, "sha256": SHA},
                "functions": ["echo"], "limits": {"gpuMemory": "256Mi", "maxBodyBytes": "2Mi"},
                "gpu": {"smPercent": 25}})  # fmt: skip
    cfg = parse_kube_tenant(obj, token="tok-123456", module_data=b"\0asm", module_origin="ConfigMap team-a/m")
    assert cfg.module.data == b"\0asm" and cfg.module.describe() == "ConfigMap team-a/m"
    assert cfg.generation == 3 and cfg.namespace == "team-a" and cfg.sm_percent == 25
    assert cfg.limits.gpu_memory_bytes == 256 << 20 and cfg.limits.max_body_bytes == 2 << 20


def test_kube_tenant_errors() -> None:
    with pytest.raises(
        InvalidSpec, match=r"spec\.module: exactly one of module\.configMapRef or module\.url"
    ):
        parse_kube_tenant(kube({"module": {"sha256": SHA}}), token="t" * 10, module_data=None)
    with pytest.raises(InvalidSpec, match=r"spec\.module\.sha256"):
        parse_kube_tenant(
            kube({"module": {"url": "https://x/m", "sha256": "z"}}), token="t" * 10, module_data=None
        )
    with pytest.raises(InvalidSpec, match=r"empty 'token'"):
        parse_kube_tenant(
            kube({"module": {"url": "https://x/m", "sha256": SHA}, "functions": ["f"]}),
            token="",
            module_data=None,
        )
