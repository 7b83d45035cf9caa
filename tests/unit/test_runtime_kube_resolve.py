"""The Kubernetes source's pure half: a re-list becomes configs and refusals; the status it writes."""

from __future__ import annotations

from tensorwasm.runtime.shard import TenantStatus
from tensorwasm.runtime.sources.kube import ClusterView, build_runtime_status, referenced, resolve_tenants

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
