"""The operator stops at start with one clear line (exit 1) when it cannot work, instead of retrying for ever.

The real `tensorwasm operator` process and the real preflight; the API server is tests/fake_kube.py
(it serves no CRDs) or nothing at all. The real API server's verdicts (401, a served CRD) are in
tests/cluster/test_operator_startup.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tensorwasm.operator.preflight import StartupError, preflight
from tests.fake_kube import FakeKube, with_fake_kube

REPO = Path(__file__).resolve().parents[2]


def kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
        f"clusters: [{{name: c, cluster: {{server: '{server}', insecure-skip-tls-verify: true}}}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\n"
        "users: [{name: u, user: {token: t0ken}}]\n"
    )
    return path


def run_operator(kubeconfig: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORWASM_OPERATOR_", "KUBERNETES_"))}
    return subprocess.run(
        [sys.executable, "-m", "tensorwasm.cli.main", "operator"],
        env={**clean, "KUBECONFIG": str(kubeconfig), **env},
        capture_output=True,
        text=True,
        timeout=120,  # a guard for a broken test: the operator's own bound is STARTUP_TIMEOUT
        cwd=REPO,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_api_server_exits_1_with_one_line_after_the_bounded_retry(tmp_path: Path) -> None:
    server = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    done = run_operator(kubeconfig(tmp_path, server), TENSORWASM_OPERATOR_STARTUP_TIMEOUT="2")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"tensorwasm operator: cannot reach the API server at {server}")
    assert "gave up after 2 s: TENSORWASM_OPERATOR_STARTUP_TIMEOUT" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "no kubeconfig at"),
        ("clusters: [\n", "cannot load Kubernetes credentials: while parsing"),
        ("apiVersion: v1\nkind: Config\ncurrent-context: nowhere\n", "no context named 'nowhere'"),
    ],
)
def test_a_bad_kubeconfig_exits_1_at_once_with_one_line(
    tmp_path: Path, text: str | None, expected: str
) -> None:
    path = tmp_path / "kubeconfig"
    if text is not None:
        path.write_text(text)
    done = run_operator(path)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, done.stderr


def test_missing_crds_are_named_with_the_fix_and_refused_credentials_fail_at_once(tmp_path: Path) -> None:
    async def body(fake: FakeKube) -> None:
        os.environ["KUBECONFIG"] = str(kubeconfig(tmp_path, fake.url))
        try:
            with pytest.raises(StartupError) as missing:
                await preflight(["team-a"], timeout_s=1)
            assert "the Tenant and Snapshot CRDs (tensorwasm.io/v1alpha1) are not installed" in str(
                missing.value
            )
            assert "kubectl apply -f crds/" in str(missing.value)
            # 401 is no transient state: no waiting for the deadline (an hour here).
            fake.fail("GET", "/apis/tensorwasm.io/v1alpha1", 401)
            with pytest.raises(StartupError, match=r"refused the credentials \(401 Unauthorized\)"):
                await asyncio.wait_for(preflight(["team-a"], timeout_s=3600), 60)
        finally:
            os.environ.pop("KUBECONFIG")

    with_fake_kube(body)
