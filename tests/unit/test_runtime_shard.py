"""The tenant registry: load, update, refuse and unload tenants through one path, others untouched."""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

from tensorwasm.runtime.shard import TenantStatus
from tensorwasm.runtime.sources.localfile import read_tenants_file
from tests.runtime_fixtures import FIXTURES, runtime_server, sha256_of, tenant  # noqa: F401  (fixture)

ALPHA = tenant("alpha", "echo.wat", ["echo"])
BETA = tenant("beta", "sum.wat", ["sum"])


def test_token_rotation_swaps_without_reload(runtime_server) -> None:  # noqa: F811
    server = runtime_server([ALPHA, BETA])
    pool = server.shard.served["alpha"].pool
    rotated = replace(ALPHA, token="rotated-token-alpha", generation=2)
    server.sync([rotated, BETA])
    assert server.shard.served["alpha"].pool is pool  # same warm instances
    assert server.invoke(ALPHA, "echo", b"x").status == 401
    assert server.invoke(rotated, "echo", b"x").body == b"x"
    assert server.shard.status("alpha") == TenantStatus(True, "ModuleLoaded", "serving 1 function(s)", 2, 0)


def test_module_change_reloads_and_a_bad_update_keeps_the_old_version(runtime_server) -> None:  # noqa: F811
    server = runtime_server([ALPHA, BETA])
    # alpha now serves sum.wat: a real reload.
    new = replace(BETA, name="alpha", token=ALPHA.token, generation=2)
    server.sync([new, BETA])
    assert struct.unpack("<q", server.invoke(new, "sum", struct.pack("<2i", 4, 5)).body) == (9,)
    # A mismatched digest at generation 3 keeps generation 2 serving, and says so.
    broken = replace(new, module=replace(new.module, sha256="f" * 64), generation=3)
    server.sync([broken, BETA])
    status = server.shard.status("alpha")
    assert status is not None and status.loaded and status.reason == "DigestMismatch"
    assert status.generation == 2 and "still serving generation 2" in status.message
    assert server.invoke(new, "sum", struct.pack("<i", 1)).status == 200
    assert server.shard.status("beta") == TenantStatus(True, "ModuleLoaded", "serving 1 function(s)", 0, 0)


def test_refusals_are_per_tenant(runtime_server) -> None:  # noqa: F811
    server = runtime_server([ALPHA])
    clash = replace(BETA, token=ALPHA.token)
    missing = tenant("gamma", "echo.wat", ["echo", "nope"])
    server.sync(
        [ALPHA, clash, missing], {"delta": TenantStatus(False, "SecretMissing", "Secret x not found")}
    )
    statuses = {n: server.shard.status(n) for n in ("alpha", "beta", "gamma", "delta")}
    assert statuses["alpha"] is not None and statuses["alpha"].loaded
    assert statuses["beta"] is not None and statuses["beta"].reason == "TokenConflict"
    assert statuses["gamma"] is not None and statuses["gamma"].reason == "MissingFunction"
    assert "nope" in statuses["gamma"].message
    assert statuses["delta"] is not None and statuses["delta"].reason == "SecretMissing"
    ready, detail = server.shard.readiness()
    assert ready and detail["failed"] == {"beta": "TokenConflict", "gamma": "MissingFunction",
                                          "delta": "SecretMissing"}  # fmt: skip
    # alpha's token still reaches alpha only.
    assert server.invoke(ALPHA, "echo", b"a").body == b"a"
    assert server.request("GET", "/readyz").status == 200


def test_removed_tenant_stops_serving_and_a_deleted_secret_revokes(runtime_server) -> None:  # noqa: F811
    server = runtime_server([ALPHA, BETA])
    server.sync([BETA])
    assert "alpha" not in server.shard.served and server.shard.status("alpha") is None
    assert server.invoke(ALPHA, "echo", b"").status == 401
    server.sync([], {"beta": TenantStatus(False, "SecretMissing", "Secret beta-token not found")})
    assert server.invoke(BETA, "sum", b"").status == 401
    assert server.shard.status("beta") == TenantStatus(False, "SecretMissing", "Secret beta-token not found")


def test_readyz_is_503_until_the_first_list_arrives(runtime_server) -> None:  # noqa: F811
    server = runtime_server([])
    server.shard.synced = False
    reply = server.request("GET", "/readyz")
    assert reply.status == 503 and reply.json()["synced"] is False
    server.sync([ALPHA])
    assert server.request("GET", "/readyz").status == 200


def test_tenants_file_entries_fail_alone(tmp_path: Path) -> None:
    echo = FIXTURES / "echo.wat"
    (tmp_path / "tenants.yaml").write_text(
        f"tenants:\n"
        f"  - {{name: good, token: good-token-1, module: {{path: {echo}, sha256: {sha256_of(echo)}}}}}\n"
        f"  - {{name: bad, token: bad-token-12, module: {{path: {echo}, sha256: nope}}}}\n"
    )
    parsed = read_tenants_file(tmp_path / "tenants.yaml")
    assert [c.name for c in parsed.configs] == ["good"]
    assert parsed.failed["bad"].reason == "InvalidSpec"
    assert "tenants[1].module.sha256" in parsed.failed["bad"].message


def test_two_new_tenants_loading_at_once_cannot_share_a_token(runtime_server) -> None:  # noqa: F811
    server = runtime_server([])
    twin = replace(BETA, token=ALPHA.token)
    server.sync([ALPHA, twin])  # both load concurrently
    statuses = [server.shard.status(n) for n in ("alpha", "beta")]
    assert sorted(s.reason for s in statuses if s is not None) == ["ModuleLoaded", "TokenConflict"]
    assert len(server.shard.by_auth) == 1
