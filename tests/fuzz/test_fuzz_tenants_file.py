"""Fuzz the tenant config readers (Hypothesis, fixed budget): whatever a tenants file holds, the
standalone reader returns per-tenant verdicts or one TenantsFileError (never another exception,
which used to end the shard); whatever a Tenant object holds, parse_kube_tenant returns a config
or InvalidSpec. Files the entries name (token, kernel) are fuzzed too, non-UTF-8 bytes included."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tensorwasm.api.fields import InvalidSpec
from tensorwasm.runtime.sources.localfile import TenantsFileError, read_tenants_file
from tensorwasm.runtime.tenancy.config import parse_kube_tenant
from tests.fuzz.test_fuzz_snapshot_codec import json_values

BUDGET = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SHA = "ab" * 32

entry_fields = st.fixed_dictionaries(
    {"name": st.sampled_from(["alpha", "beta", "Bad_Name", ""])},
    optional={
        "token": st.one_of(st.text(max_size=20), json_values),
        "tokenFile": st.sampled_from(["token.bin", "missing", "/etc/hostname"]),
        "module": st.one_of(
            st.just({"path": "m.wat", "sha256": SHA}),
            st.just({"url": "https://x/m", "sha256": SHA}),
            json_values,
        ),
        "functions": st.one_of(st.lists(st.text(max_size=8), max_size=3), json_values),
        "limits": st.one_of(
            st.dictionaries(
                st.sampled_from(["timeoutMs", "linearMemory", "gpuMemory", "maxBodyBytes", "queueLength"]),
                json_values,
                max_size=3,
            ),
            json_values,
        ),
        "kernels": st.one_of(st.just([{"name": "k", "path": "kernel.ptx"}]), json_values),
        "gpu": json_values,
    },
)


def read(tmp: Path, text: bytes, token: bytes, kernel: bytes) -> None:
    (tmp / "token.bin").write_bytes(token)
    (tmp / "kernel.ptx").write_bytes(kernel)
    (tmp / "tenants.yaml").write_bytes(text)
    try:
        parsed = read_tenants_file(tmp / "tenants.yaml")
    except TenantsFileError:
        return
    for status in parsed.failed.values():
        assert status.reason == "InvalidSpec" and status.message


@BUDGET
@given(st.lists(entry_fields, max_size=3), st.binary(max_size=40), st.binary(max_size=40))
@example(entries=[{"name": "alpha", "tokenFile": "token.bin", "module": {"path": "m.wat", "sha256": SHA}}],
         token=b"\xff\xfe not utf-8 token", kernel=b"")  # fmt: skip
@example(entries=[{"name": "alpha", "token": "t" * 12, "module": {"path": "m.wat", "sha256": SHA},
                   "kernels": [{"name": "k", "path": "kernel.ptx"}]}],
         token=b"", kernel=b"\x80\x81 not utf-8 ptx")  # fmt: skip
def test_any_tenants_file_entry_fails_alone(
    tmp_path: Path, entries: list[dict[str, Any]], token: bytes, kernel: bytes
) -> None:
    read(tmp_path, yaml.safe_dump({"tenants": entries}).encode(), token, kernel)


@BUDGET
@given(st.binary(max_size=200))
@example(b"\xff\xfe\x00tenants: []")  # not UTF-8
@example(b"tenants: " + b"[" * 5000)  # nesting deeper than the parser's recursion
@example(b"tenants: [&a [*a]]")
def test_any_bytes_as_a_tenants_file_are_a_verdict(tmp_path: Path, text: bytes) -> None:
    read(tmp_path, text, b"token-0123456789", b"")


@BUDGET
@given(json_values, st.one_of(st.none(), st.binary(max_size=8)))
def test_any_tenant_object_is_a_config_or_invalid_spec(spec: Any, module: bytes | None) -> None:
    body = {"metadata": {"name": "alpha", "namespace": "ns", "uid": "u", "generation": 1}, "spec": spec}
    with contextlib.suppress(InvalidSpec):
        parse_kube_tenant(body, token="t" * 12, module_data=module)
