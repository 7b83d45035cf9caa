"""The project's API client honours 429 + Retry-After (API priority and fairness, a CRD's storage
re-initialising) instead of failing the reconcile, and still fails on other errors and past its budget."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from tensorwasm.kube import client as kube_client
from tensorwasm.kube.client import KubeApi, KubeError
from tensorwasm.kube.config import ConfigError, Connection, load_connection


async def serve(
    responses: list[tuple[int, dict[str, Any], dict[str, str]]],
) -> tuple[web.AppRunner, str, list[int]]:
    seen: list[int] = []

    async def handler(_request: web.Request) -> web.Response:
        status, body, headers = responses[min(len(seen), len(responses) - 1)]
        seen.append(status)
        return web.json_response(body, status=status, headers=headers)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}", seen


def api_for(server: str) -> KubeApi:
    return KubeApi(Connection(server, ssl=False), "test")


def test_retries_429_with_retry_after_then_succeeds() -> None:
    async def scenario() -> tuple[list[dict[str, Any]], list[int]]:
        throttled = (429, {"reason": "TooManyRequests", "message": "storage is (re)initializing"},
                     {"Retry-After": "0.1"})  # fmt: skip
        runner, server, seen = await serve([throttled, throttled, (200, {"items": [{"a": 1}]}, {})])
        api = api_for(server)
        try:
            return await api.list("/apis/tensorwasm.io/v1alpha1/namespaces/ns/snapshots"), seen
        finally:
            await api.close()
            await runner.cleanup()

    items, seen = asyncio.run(scenario())
    assert items == [{"a": 1}] and seen == [429, 429, 200]


def test_other_errors_and_an_exhausted_budget_still_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(status: int) -> tuple[KubeError, list[int]]:
        runner, server, seen = await serve(
            [(status, {"reason": "Nope", "message": "no"}, {"Retry-After": "0.1"})]
        )
        api = api_for(server)
        try:
            with pytest.raises(KubeError) as info:
                await api.list("/api/v1/namespaces/ns/secrets")
            return info.value, seen
        finally:
            await api.close()
            await runner.cleanup()

    forbidden, seen = asyncio.run(scenario(403))
    assert forbidden.status == 403 and seen == [403]
    monkeypatch.setattr(kube_client, "THROTTLE_RETRY_S", 0.35)
    throttled, seen = asyncio.run(scenario(429))
    assert throttled.status == 429 and 2 <= len(seen) <= 5


def write_kubeconfig(path: Path, user: dict[str, Any], cluster: dict[str, Any]) -> Path:
    doc = {
        "current-context": "dev",
        "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u"}}],
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def test_kubeconfig_token_and_token_file(tmp_path: Path) -> None:
    conn = load_connection(write_kubeconfig(tmp_path / "a", {"token": "t0k"}, {"server": "http://h:1/"}))
    assert (conn.server, conn.auth_headers(), conn.ssl) == (
        "http://h:1",
        {"Authorization": "Bearer t0k"},
        False,
    )
    (tmp_path / "tok").write_text("first\n")
    conn = load_connection(
        write_kubeconfig(
            tmp_path / "b", {"tokenFile": "tok"}, {"server": "https://h", "insecure-skip-tls-verify": True}
        )
    )
    assert conn.auth_headers() == {"Authorization": "Bearer first"}
    (tmp_path / "tok").write_text("rotated\n")  # projected tokens rotate: the file is read again
    assert conn.auth_headers() == {"Authorization": "Bearer rotated"}


def test_unsupported_credentials_say_so(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path / "c", {"exec": {"command": "aws"}}, {"server": "https://h"})
    with pytest.raises(ConfigError, match="exec and auth-provider credentials are not supported"):
        load_connection(path)
    with pytest.raises(ConfigError, match="no in-cluster service account and no kubeconfig"):
        load_connection(env={"KUBECONFIG": str(tmp_path / "missing")})
