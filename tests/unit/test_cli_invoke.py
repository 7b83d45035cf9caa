"""`tensorwasm invoke` (and `kubectl tensorwasm invoke`) against a real runtime shard: plain, streamed
and async invokes, the load test's histogram, every refusal in the error envelope, the flag bounds.
Reaching a tenant through the kubeconfig and a port-forward is tests/cluster/test_cli_invoke_cluster.py."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tensorwasm.cli import invoke
from tensorwasm.cli.main import main as cli_main
from tensorwasm.runtime.tenancy.config import TenantConfig
from tests.runtime_fixtures import RuntimeServer, runtime_server, tenant

__all__ = ["runtime_server"]

Run = Callable[..., tuple[int, bytes, str]]


@pytest.fixture
def run(capsysbinary: pytest.CaptureFixture[bytes]) -> Run:
    """`run(server, cfg, *args)`: the CLI against `server` as `cfg`; (exit code, stdout bytes, stderr)."""

    def call(
        server: RuntimeServer, cfg: TenantConfig, *args: str, token: str | None = None
    ) -> tuple[int, bytes, str]:
        code = cli_main(["invoke", cfg.name, *args, "--url", server.url, "--token", token or cfg.token])
        out, err = capsysbinary.readouterr()
        return code, out, err.decode()

    return call


def test_a_plain_invoke_prints_the_output_bytes(runtime_server, run: Run, tmp_path: Path) -> None:
    cfg = tenant("alpha")
    server = runtime_server([cfg])
    assert run(server, cfg, "echo", "-d", "hello") == (0, b"hello", "")
    payload = bytes(range(256)) * 100
    (tmp_path / "in.bin").write_bytes(payload)
    assert run(server, cfg, "echo", "-d", f"@{tmp_path / 'in.bin'}")[:2] == (0, payload)


def test_input_from_stdin(runtime_server, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tenant("alpha")
    server = runtime_server([cfg])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\x00\xff")))
    assert run(server, cfg, "echo", "-d", "-")[:2] == (0, b"from stdin\x00\xff")


@pytest.mark.parametrize(
    ("function", "token", "message"),
    [
        ("echo", "not-a-token-0000000000", "HTTP 401 unauthenticated"),
        ("nope", None, "HTTP 404 not_found"),
    ],
)
def test_refusals_print_the_envelope_and_exit_1(
    runtime_server, run: Run, function: str, token: str | None, message: str
) -> None:
    cfg = tenant("alpha")
    server = runtime_server([cfg])
    code, out, err = run(server, cfg, function, "-d", "x", token=token)
    assert code == 1 and out == b"" and message in err
    # The neighbour is unaffected: the same shard still answers the right token.
    assert run(server, cfg, "echo", "-d", "still here")[:2] == (0, b"still here")


def test_an_oversize_body_is_refused_by_the_tenants_limit(runtime_server, run: Run) -> None:
    cfg = tenant("alpha", max_body_bytes=1024)
    server = runtime_server([cfg])
    code, _, err = run(server, cfg, "echo", "-d", "x" * 2000)
    assert code == 1 and "HTTP 413 payload_too_large" in err and "limit=1024" in err


def test_stream_prints_every_chunk_then_the_return_value(runtime_server, run: Run) -> None:
    cfg = tenant("streamer", "streamer.wat")
    server = runtime_server([cfg])
    assert run(server, cfg, "chunks", "--stream", "-d", "ab\ncd\n") == (0, b"ab\ncd\n" * 3 + b"end", "")
    raw = bytes(range(256))  # not UTF-8: arrives as `bytes` events, printed exactly
    code, out, _ = _run_with_stdin(run, server, cfg, raw, "chunks", "--stream")
    assert (code, out) == (0, raw * 3 + b"end")


def test_a_chunk_larger_than_a_line_buffer_streams_whole(runtime_server, run: Run) -> None:
    """A `bytes` event holds a whole chunk in one line: 300 KB of binary is 400 KB of base64."""
    cfg = tenant("streamer", "streamer.wat", max_body_bytes=1 << 20)
    server = runtime_server([cfg])
    big = bytes(range(256)) * 1200
    code, out, err = _run_with_stdin(run, server, cfg, big, "chunks", "--stream")
    assert (code, out) == (0, big * 3 + b"end"), err


def _run_with_stdin(
    run: Run, server: RuntimeServer, cfg: TenantConfig, data: bytes, *args: str
) -> tuple[int, bytes, str]:
    old = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(data))
    try:
        return run(server, cfg, *args, "-d", "-")
    finally:
        sys.stdin = old


def test_a_stream_that_fails_midway_keeps_what_arrived_and_exits_1(runtime_server, run: Run) -> None:
    cfg = tenant("streamer", "streamer.wat", timeout_ms=300)
    server = runtime_server([cfg])
    code, out, err = run(server, cfg, "flood", "--stream", "-d", "tick ")
    assert code == 1 and "stream ended with deadline_exceeded: " in err and "HTTP 200" not in err
    assert out.startswith(b"tick tick ") and set(out.split()) == {b"tick"}


def test_async_runs_a_job_and_prints_its_output(runtime_server, run: Run) -> None:
    cfg = tenant("alpha")
    server = runtime_server([cfg])
    code, out, err = run(server, cfg, "echo", "--async", "-d", "hello job")
    assert (code, out) == (0, b"hello job") and re.search(
        r"# job job-[0-9a-f]+ (queued|running|succeeded)", err
    )
    code, out, _ = run(server, cfg, "echo", "--async", "--no-wait", "-d", "later")
    job = json.loads(out)
    assert code == 0 and job["location"] == f"/v1/jobs/{job['id']}"


def test_a_failed_job_exits_1_with_its_error(runtime_server, run: Run) -> None:
    cfg = tenant("spinner", "runaway.wat", timeout_ms=50)
    server = runtime_server([cfg])
    code, out, err = run(server, cfg, "spin", "--async")
    assert code == 1 and out == b"" and re.search(r"job job-\w+ failed: deadline_exceeded", err)


def test_repeat_prints_counts_quantiles_and_a_histogram(runtime_server, run: Run) -> None:
    cfg = tenant("alpha")
    server = runtime_server([cfg])
    code, out, err = run(server, cfg, "echo", "-d", "x", "--repeat", "60", "--concurrency", "4")
    text = out.decode()
    assert code == 0 and "# 60 invokes, 4 in flight, via url" in err
    assert re.search(r"^invokes\s+60 in", text, re.M) and re.search(r"^outcomes\s+200: 60$", text, re.M)
    assert re.search(r"^latency\s+p50 [\d.]+ m?s\s+p90 .* p99 .* max ", text, re.M)
    bars = [line for line in text.splitlines() if re.match(r"^\s+[<>]=? ", line)]
    assert bars and sum(int(line.split()[3]) for line in bars) == 60


def test_repeat_counts_refusals_by_kind_and_exits_1(runtime_server, run: Run) -> None:
    cfg = tenant("alpha")
    server = runtime_server([cfg])
    code, out, _ = run(server, cfg, "missing", "--repeat", "5", "--concurrency", "2")
    assert code == 1 and re.search(r"^outcomes\s+404 not_found: 5$", out.decode(), re.M)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repeat", "0"], "--repeat must be between 1 and 100000"),
        (["--repeat", "100001"], "--repeat must be between 1 and 100000"),
        (["--repeat", "300", "--concurrency", "257"], "--concurrency must be between 1 and 256"),
        (["--repeat", "2", "--concurrency", "3"], "--concurrency 3 is more than --repeat 2"),
        (["--repeat", "2", "--stream"], "--repeat measures plain invokes"),
        (["--no-wait"], "--no-wait needs --async"),
        (["--async", "--wait", "0"], "--wait must be in"),
        (["--url", "ftp://x"], "--url must be a base URL"),
    ],
)
def test_flags_out_of_bounds_are_refused_before_anything_is_sent(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["invoke", "alpha", "echo", "--token", "t", *args]) == 2
    assert message in capsys.readouterr().err


def test_input_over_the_cap_is_refused_without_reading_it_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(invoke, "MAX_DATA_BYTES", 1000)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 5000)
    with pytest.raises(invoke.ClientError, match="input is over"):
        invoke.read_data(f"@{big}", io.BytesIO())
    with pytest.raises(invoke.ClientError, match="cannot read"):
        invoke.read_data(f"@{tmp_path / 'missing'}", io.BytesIO())


def test_no_cluster_and_no_url_says_what_to_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli_main(["invoke", "alpha", "echo"]) == 1
    assert "pass --url and --token" in capsys.readouterr().err


def test_histogram_buckets_and_quantiles() -> None:
    latencies = [0.0004] * 5 + [0.003] * 90 + [0.04] * 4 + [7.0]
    q = invoke.quantiles(latencies)
    assert (q["p50"], q["p90"], q["p99"], q["max"]) == (0.003, 0.003, 0.04, 7.0)
    lines = invoke.histogram(latencies, width=10)
    assert lines[0].split()[:4] == ["<=", "0.50", "ms", "5"]
    assert lines[-1].split()[:4] == ["<=", "10.00", "s", "1"]
    assert sum(int(line.split()[3]) for line in lines) == 100


def test_the_kubectl_plugin_is_the_same_command() -> None:
    plugin = Path(sys.executable).with_name("kubectl-tensorwasm")
    done = subprocess.run([str(plugin), "invoke", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: kubectl tensorwasm invoke")


def test_the_namespace_defaults_to_the_kubeconfig_contexts(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(
        "current-context: b\ncontexts:\n- name: a\n  context: {namespace: team-a}\n"
        "- name: b\n  context: {namespace: team-b}\n"
    )
    assert invoke.default_namespace(config, {}) == "team-b"
    assert invoke.default_namespace(None, {"KUBECONFIG": str(config)}) == "team-b"
    config.write_text("current-context: a\ncontexts:\n- name: a\n  context: {}\n")
    assert invoke.default_namespace(config, {}) == "default"


def test_a_connection_cut_after_the_request_was_sent_is_not_repeated(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    # POST invoke is not idempotent: a shard that died mid-invoke may have run the function (or made
    # the job), so the client reports the cut instead of sending the request again.
    import asyncio
    import threading

    from aiohttp import web

    received: list[bytes] = []
    ready = threading.Event()
    state: dict[str, object] = {}

    async def cut(request: web.Request) -> web.StreamResponse:
        received.append(await request.read())
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    def serve() -> None:
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/functions/{name}/invoke", cut)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        state["port"], state["loop"] = site._server.sockets[0].getsockname()[1], loop  # type: ignore[union-attr]
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        code = cli_main(["invoke", "alpha", "echo", "-d", "once", "--url", f"http://127.0.0.1:{state['port']}",
                         "--token", "a-token-0000000000", "--retry-for", "30"])  # fmt: skip
    finally:
        loop = state["loop"]
        loop.call_soon_threadsafe(loop.stop)  # type: ignore[attr-defined]
        thread.join(30)
    assert code == 1 and received == [b"once"]
    assert "broke after the request was sent" in capsysbinary.readouterr().err.decode()
