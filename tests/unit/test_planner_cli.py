"""`tensorwasm plan`: exit codes, messages naming the field, JSON shape, and the PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tensorwasm.cli.main import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_text_plan_shows_recommendation_formulas_and_triggers(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--tenants", "50", "--qps", "1000"], capsys)
    assert code == 0
    assert "Recommended SKU: Medium" in out
    assert "Binding bottleneck: gpuMemory" in out
    assert "1.5 * 50 * (5Mi MPS client + 256Mi) = 1.5 * 12.7Gi = 19.1Gi" in out
    assert "ceil(1000 * 2ms / 0.6) = ceil(3.33) = 4 vCPU" in out
    assert "traffic-doubles" in out and "SLO: 100 ms P95 /invoke (host-only)" in out


def test_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--tenants", "50", "--qps", "1000", "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert set(doc) >= {
        "workload",
        "recommended",
        "binding",
        "sharded",
        "skus",
        "replanTriggers",
        "tenantsPerHost",
    }
    assert doc["recommended"] == "Medium"
    assert [s["sku"]["name"] for s in doc["skus"]] == ["Small", "Medium", "Large"]
    medium = doc["skus"][1]
    assert [f["resource"] for f in medium["formulas"]] == [
        "memory", "gpuMemory", "cpu", "diskIops", "tenantCeiling", "qpsCeiling",
    ]  # fmt: skip
    assert medium["formulas"][0]["required"] == {
        "value": 4160 * 2**20, "unit": "bytes", "source": "modeled", "origin": "formula",
    }  # fmt: skip
    assert doc["workload"]["tenants"]["origin"] == "--tenants"
    cell = doc["tenantsPerHost"]["invoke-p95-host"]["skus"]["Medium"][0]
    assert cell == {"qps": 10, "tenants": 50, "source": "modeled", "why": "no bench figure for invoke_p95"}


def test_plot_is_a_valid_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "curves.png"
    code, out, _ = run(["--tenants", "20", "--plot", str(target)], capsys)
    assert code == 0 and f"Wrote {target}" in out
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(target) as image:
        image.load()  # decodes every chunk; raises on a corrupt file
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 200


def test_no_fit_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--tenants", "100", "--sku", "Small"], capsys)
    assert code == 1 and "No single host fits" in out
    code, out, _ = run(["--tenants", "1000", "--qps", "5000"], capsys)
    assert code == 0 and "Shard: 5 x Large" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--tenants: is required"),
        (["--tenants", "-3"], "--tenants: must not be negative"),
        (["--tenants", "10", "--working-set", "16"], "--working-set: '16' has no unit"),
        (["--tenants", "10", "--cpu-per-request", "2"], "--cpu-per-request: '2' has no unit"),
        (["--tenants", "10", "--target-utilisation", "150%"], "--target-utilisation: must be above 0"),
        (["--tenants", "1e9"], "--tenants: 1e+09 is implausibly large"),
        (["--tenants", "10", "--sku", "Huge"], "--sku: unknown SKU 'Huge'"),
        (["--tenants", "10", "--skus-file", "/nonexistent.yaml"], "--skus-file: cannot read"),
        (["llm"], "--params: is required for a custom shape"),
        (["llm", "--model", "gpt-9"], "--model: unknown model"),
        (["llm", "--model", "Llama-3-70B", "--weight-dtype", "fp16"], "--gpu-memory:"),
        (["llm", "--model", "Llama-3-8B", "--gpu", "Z80"], "--gpu: unknown GPU 'Z80'"),
        (["llm", "--model", "Llama-3-8B", "--contexts", "0"], "--contexts: must be at least 1"),
        (["goodput", "--p95", "100ms", "--p99", "250ms"], "--curve: is required"),
        (
            ["goodput", "--curve", "/nonexistent.json", "--p95", "100ms", "--p99", "1s"],
            "--curve: cannot read",
        ),
    ],
)
def test_bad_input_exits_2_naming_the_field(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2
    assert message in err
    assert out == ""


def test_llm_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["llm", "--model", "Llama-3-8B", "--gpu", "H100-80GB", "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["kvBytesPerToken"] == 131072
    assert doc["model"]["kvHeads"] == 8
    assert [r["context"] for r in doc["maxConcurrentRequests"]] == [512, 1024, 2048, 4096, 8192]
    assert doc["decodeRoofline"][0]["batch"] == 1


def test_llm_custom_shape(capsys: pytest.CaptureFixture[str]) -> None:
    shape = [
        "--params",
        "7e9",
        "--layers",
        "32",
        "--attention-heads",
        "32",
        "--kv-heads",
        "8",
        "--head-dim",
        "128",
    ]
    argv = ["llm", *shape, "--gpu-memory", "24GB", "--bandwidth", "300GB/s", "--gpu", "L4-ish"]
    code, out, _ = run(argv, capsys)
    assert code == 0 and "Model custom" in out and "max concurrent requests" in out


def test_goodput_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    curve = tmp_path / "load.json"
    points = [
        {"load": 100, "p95_ms": 20, "p99_ms": 40},
        {"load": 800, "p95_ms": 60, "p99_ms": 180},
        {"load": 1200, "p95_ms": 90, "p99_ms": 400},
    ]
    curve.write_text(json.dumps({"title": "load", "figures": {}, "curve": points}))
    code, out, _ = run(["goodput", "--bench-results", str(tmp_path), "--p95", "100ms", "--p99", "250ms",
                        "--peak-load", "5000", "--json"], capsys)  # fmt: skip
    assert code == 0
    doc = json.loads(out)
    assert doc["goodputPerReplica"] == 800 and doc["replicas"]["total"] == 10
    code, _, _ = run(["goodput", "--curve", str(curve), "--p95", "1ms", "--p99", "2ms"], capsys)
    assert code == 1
