"""The Kubernetes source's pure half: a re-list becomes configs and refusals; the status it writes."""

from __future__ import annotations

from typing import Any

import pytest

from tensorwasm.api.conditions import Placement, desired_status, status_patch
from tensorwasm.api.tenant import parse_tenant
from tensorwasm.runtime.shard import TenantStatus
from tensorwasm.runtime.sources.kube import (
    ClusterView,
    ResolveMemo,
    build_runtime_status,
    readiness_patch,
    referenced,
    resolve_tenants,
)

SHA = "b" * 64


def tenant_obj(name: str, **spec: object) -> dict[str, object]:
    base: dict[str, object] = {
        "module": {"configMapRef": {"name": f"{name}-module", "key": "module.wasm"}, "sha256": SHA},
        "functions": ["echo"],
        "authSecretRef": {"name": f"{name}-token"},
    }
    base.update(spec)
    return {"metadata": {"name": name, "namespace": "ns", "generation": 4}, "spec": base,
            "status": {"shard": "shard-0"}}  # fmt: skip


def test_resolved_and_refused_tenants() -> None:
    ok, no_secret, no_key, url = (
        tenant_obj("ok"),
        tenant_obj("nosecret"),
        tenant_obj("nokey"),
        tenant_obj("url", module={"url": "https://example.com/m.wasm", "sha256": SHA}),
    )
    view = ClusterView(
        [ok, no_secret, no_key, url],
        configmaps={"ok-module": {"module.wasm": b"\0asm"}, "nokey-module": {"other": b""}},
        secrets={"ok-token": {"token": b"tok-ok-123\n"}, "nokey-token": {"token": b"tok-nokey-1"},
                 "url-token": {"token": b"tok-url-123"}},
    )  # fmt: skip
    configs, failed = resolve_tenants(view)
    by_name = {c.name: c for c in configs}
    assert set(by_name) == {"ok", "url"}
    assert by_name["ok"].token == "tok-ok-123" and by_name["ok"].module.data == b"\0asm"
    assert by_name["ok"].generation == 4
    assert by_name["url"].module.url == "https://example.com/m.wasm"
    assert failed["nosecret"] == TenantStatus(False, "SecretMissing", "Secret ns/nosecret-token not found", 4)
    assert failed["nokey"].reason == "ConfigMapMissing" and "no key 'module.wasm'" in failed["nokey"].message


def test_a_bad_primary_token_or_ptx_refuses_only_its_own_tenant_and_a_bad_extra_key_is_ignored() -> None:
    """Secret values are bytes anyone with write access to the Secret chooses: a primary `token` that
    is not a usable token refuses that tenant (InvalidSpec, the key named), never the pass (issue
    F15). A bad *extra* key (rotation or read token) is ignored and named in the tenant's notes, and
    the tenant serves with its other tokens (review R2 G7): one bad key added to a serving tenant's
    Secret must not take it down."""
    good = tenant_obj("good")
    bad = {
        "spaced": tenant_obj("spaced"),  # token: has inner whitespace
        "huge": tenant_obj("huge"),  # token: over 4096 characters (no HTTP header could carry it)
        "ptx": tenant_obj("ptx", kernels=[{"name": "k", "configMapRef": {"name": "ptx-cm", "key": "k.ptx"}}]),
    }
    ignoring = {
        "binary": tenant_obj("binary"),  # read-token.x: not UTF-8
        "weak": tenant_obj("weak"),  # token.next: 3 characters
        "long": tenant_obj("long"),  # read-token.ci: 4097 characters
    }
    module = {"module.wasm": b"\0asm"}
    view = ClusterView(
        [good, *bad.values(), *ignoring.values()],
        configmaps={f"{n}-module": module for n in ("good", *bad, *ignoring)}
        | {"ptx-cm": {"k.ptx": b"\xff\xfe"}},
        secrets={
            "good-token": {"token": b"tok-good-1", "read-token": b"reader-good-1"},
            "binary-token": {
                "token": b"tok-binary-1",
                "read-token.x": b"\xff\xfe",
                "token.ok": b"tok-binary-2",
            },
            "weak-token": {"token": b"tok-weak-1", "token.next": b"abc"},
            "long-token": {"token": b"tok-long-1", "read-token.ci": b"r" * 4097},
            "spaced-token": {"token": b"tok spaced 1"},
            "huge-token": {"token": b"t" * 4097},
            "ptx-token": {"token": b"tok-ptx-001"},
        },
    )
    configs, failed = resolve_tenants(view)
    by_name = {c.name: c for c in configs}
    assert set(by_name) == {"good", *ignoring} and set(failed) == set(bad)
    assert {f.reason for f in failed.values()} == {"InvalidSpec"}
    assert "key 'token': a token needs at least 8 characters and no whitespace" in failed["spaced"].message
    assert "key 'token': a token has at most 4096 characters, this one 4097" in failed["huge"].message
    assert "spec.kernels[0]: the PTX in ConfigMap ns/ptx-cm is not UTF-8" in failed["ptx"].message
    assert by_name["good"].notes == ()
    (binary,) = by_name["binary"].notes
    assert binary.startswith("ignored Secret ns/binary-token key 'read-token.x': the token is not UTF-8")
    assert [key for key, _, _ in by_name["binary"].extra_tokens] == ["token.ok"]  # the good one is kept
    (weak,) = by_name["weak"].notes
    assert "key 'token.next': a token needs at least 8 characters" in weak and "abc" not in weak
    assert by_name["weak"].extra_tokens == () and by_name["weak"].token == "tok-weak-1"
    (long,) = by_name["long"].notes
    assert "key 'read-token.ci': a token has at most 4096 characters, this one 4097" in long
    assert "rrrr" not in long  # the key is named, never its value


def test_invalid_spec_is_refused_with_the_field() -> None:
    bad = tenant_obj("bad", limits={"linearMemory": "lots"})
    view = ClusterView([bad], {"bad-module": {"module.wasm": b""}}, {"bad-token": {"token": b"t-12345678"}})
    _, failed = resolve_tenants(view)
    assert failed["bad"].reason == "InvalidSpec" and "spec.limits.linearMemory" in failed["bad"].message


def test_references_and_status_shape() -> None:
    obj = tenant_obj("k", kernels=[{"name": "my_kernel", "configMapRef": {"name": "ptx", "key": "k.ptx"}}])
    assert referenced(obj) == ({"k-module", "ptx"}, {"k-token"})
    report = build_runtime_status("shard-0", TenantStatus(True, "ModuleLoaded", "serving", 4, 2 << 20))
    assert report == {"shard": "shard-0", "observedGeneration": 4, "loaded": True, "reason": "ModuleLoaded",
                      "message": "serving", "gpuBytesInUse": 2 << 20}  # fmt: skip


def test_without_auth_secret_ref_the_operator_created_secret_is_used() -> None:
    obj = tenant_obj("plain")
    obj["spec"].pop("authSecretRef")  # type: ignore[attr-defined]
    view = ClusterView(
        [obj], {"plain-module": {"module.wasm": b"\0asm"}}, {"tw-plain-token": {"token": b"t-plain-1"}}
    )
    configs, failed = resolve_tenants(view)
    assert failed == {} and [c.token for c in configs] == ["t-plain-1"]
    assert referenced(obj) == ({"plain-module"}, {"tw-plain-token"})


def placed_by_operator(obj: dict[str, Any], now: str) -> dict[str, Any]:
    """The Tenant as the operator leaves it after placing it on shard-0 (its status write applied)."""
    tenant = parse_tenant(obj)
    status = desired_status(tenant, Placement("shard-0"), "http://tw-k.ns.svc:80", "k-token", now)
    return {**obj, "status": status}


def operator_patch(obj: dict[str, Any], now: str) -> dict[str, Any]:
    """What the operator would write when it reconciles `obj` at `now` (empty: nothing)."""
    tenant = parse_tenant(obj)
    live = obj["status"]
    return status_patch(live, desired_status(tenant, Placement("shard-0"), live.get("endpoint"),
                                             live.get("tokenSecretName"), now))  # fmt: skip


@pytest.mark.parametrize(
    ("report", "phase"),
    [
        (TenantStatus(True, "ModuleLoaded", "serving", 4, 2 << 20), "Ready"),
        (TenantStatus(False, "DigestMismatch", "sha256 differs", 4), "Degraded"),
    ],
)
def test_the_shards_readiness_is_what_the_operator_derives(report: TenantStatus, phase: str) -> None:
    obj = placed_by_operator(tenant_obj("k"), "2026-11-23T10:00:00Z")
    runtime = build_runtime_status("shard-0", report)
    patch = readiness_patch(obj, runtime, "2026-11-23T10:00:05Z")
    assert patch["phase"] == phase and set(patch) <= {"phase", "conditions", "gpuBytesInUse", "gpuInUse"}
    written = {**obj, "status": {**obj["status"], **patch, "runtime": runtime}}
    # The operator reconciling the shard's write a minute later finds nothing to change.
    assert operator_patch(written, "2026-11-23T10:01:00Z") == {}
    placed, module_ready, ready = written["status"]["conditions"]
    assert placed["lastTransitionTime"] == "2026-11-23T10:00:00Z"  # unchanged: still placed
    assert module_ready["lastTransitionTime"] == "2026-11-23T10:00:05Z"  # Unknown -> True/False
    # Ready flips only to True; a Degraded tenant's Ready stays False since placement.
    assert ready["lastTransitionTime"] == (
        "2026-11-23T10:00:05Z" if report.loaded else "2026-11-23T10:00:00Z"
    )
    assert written["status"]["gpuBytesInUse"] == report.gpu_bytes_in_use


def test_an_unchanged_readiness_adds_nothing_and_an_unplaced_tenant_gets_none() -> None:
    obj = placed_by_operator(tenant_obj("k"), "2026-11-23T10:00:00Z")
    runtime = build_runtime_status("shard-0", TenantStatus(True, "ModuleLoaded", "", 4, 0))
    first = readiness_patch(obj, runtime, "2026-11-23T10:00:05Z")
    written = {**obj, "status": {**obj["status"], **first, "runtime": runtime}}
    more_gpu = build_runtime_status("shard-0", TenantStatus(True, "ModuleLoaded", "", 4, 4096))
    assert readiness_patch(written, more_gpu, "2026-11-23T10:02:00Z") == {
        "gpuBytesInUse": 4096,
        "gpuInUse": "4Ki",
    }
    assert readiness_patch(written, runtime, "2026-11-23T10:02:00Z") == {}
    unplaced = {**tenant_obj("k"), "status": {}}
    assert readiness_patch(unplaced, runtime, "2026-11-23T10:02:00Z") == {}


def test_a_tenant_is_parsed_again_only_when_it_or_what_it_references_changes() -> None:
    view = ClusterView(
        [tenant_obj("k"), tenant_obj("m")],
        {"k-module": {"module.wasm": b"\0asm"}, "m-module": {"module.wasm": b"\0asm"}},
        {"k-token": {"token": b"t-k-0001"}},
        versions={"configmaps/k-module": "5", "configmaps/m-module": "6", "secrets/k-token": "7"},
    )
    memo: ResolveMemo = {}
    configs, failed = resolve_tenants(view, memo)
    assert [c.token for c in configs] == ["t-k-0001"] and failed["m"].reason == "SecretMissing"
    again, failed_again = resolve_tenants(view, memo)
    assert again[0] is configs[0] and failed_again["m"] is failed["m"]  # nothing re-parsed
    # The Secret rotates (new version) and m's Secret arrives: both are resolved anew.
    view.secrets = {"k-token": {"token": b"t-k-0002"}, "m-token": {"token": b"t-m-0001"}}
    view.versions.update({"secrets/k-token": "8", "secrets/m-token": "9"})
    rotated, none_failed = resolve_tenants(view, memo)
    assert [c.token for c in rotated] == ["t-k-0002", "t-m-0001"] and none_failed == {}
    # A tenant no longer listed leaves the memo.
    view.tenants = view.tenants[:1]
    resolve_tenants(view, memo)
    assert set(memo) == {"k"}
