"""The chart's alerts and Grafana dashboard, checked by Prometheus' own tool (promtool).

Covers: the rendered PrometheusRule passes `promtool check rules`; every alert has firing and quiet
cases in test_alerts_cases.yaml that pass `promtool test rules`; every dashboard query parses as
PromQL; the dashboard uses only metrics the runtime exports (and says which it leaves out); the
dashboard's error ratio and the error alert count the same outcomes, the 5xx kinds of errors.py.
Needs promtool (Debian's `prometheus`, installed by `make deps`) and helm (the control-plane build).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tensorwasm.dev.cluster import build_binaries
from tensorwasm.runtime import errors, metrics
from tests import chart

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = chart.CHART / "files" / "dashboards" / "tensorwasm.json"
CASES = Path(__file__).with_name("test_alerts_cases.yaml")
NAMESPACE = "tw"  # the release namespace the cases are written for
# Grafana's variables, as a user who picked namespace tw and every tenant would get them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": NAMESPACE, "$tenant": ".*"}
# Runtime metrics the dashboard leaves out on purpose; a new runtime metric must land here or on it.
NOT_ON_DASHBOARD = {
    "tensorwasm_accelerator_info": "a label carrier (backend, device), shown by kubectl, not plotted",
    "tensorwasm_mps_info": "a label carrier (mode)",
    "tensorwasm_tenant_gpu_pool_reserved_bytes": "driver-side view of tenant_gpu_memory_bytes",
    "tensorwasm_guest_log_lines_dropped_total": "a tenant's own logging budget; its logs say so",
    "tensorwasm_guest_limit_exceeded_total": "counted in invocations_total's outcome as well",
    "tensorwasm_gpu_temperature_celsius": "node exporters plot it beside the other hardware",
    "tensorwasm_snapshot_bytes_total": "capacity planning, not operations",
    "tensorwasm_snapshot_rejected_total": "rare; each one is a Degraded condition with a reason",
    "tensorwasm_snapshot_hot_tier_lookups_total": "tuning of shard.snapshots.hotTier",
    "tensorwasm_snapshot_hot_tier_evictions_total": "tuning of shard.snapshots.hotTier",
    "tensorwasm_snapshot_hot_tier_bytes": "tuning of shard.snapshots.hotTier",
    "tensorwasm_resident_gpu_bytes": "tuning of the shard's resident GPU budget for idle sleep",
    "tensorwasm_tenant_sleep_failures_total": "rare; each is a warning log line naming the tenant and error",
}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=120
    )


@pytest.fixture(scope="module", autouse=True)
def _needs_promtool() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed: `make deps` installs Debian's prometheus package")


@pytest.fixture(scope="module")
def rule_spec() -> dict[str, Any]:
    """The PrometheusRule's spec (a Prometheus rule file) as `helm template` renders it by default."""
    helm = build_binaries(log=lambda _: None) / "helm"
    (rule,) = chart.render(
        helm, "monitoring.force=true", namespace=NAMESPACE, only="templates/shard-prometheusrule.yaml"
    )
    assert rule["kind"] == "PrometheusRule"
    spec: dict[str, Any] = rule["spec"]
    return spec


def alert_rules(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in spec["groups"] for r in g["rules"] if "alert" in r}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", ()):
        yield panel
        yield from panels(panel)  # rows hold their own panels


def dashboard_queries() -> dict[str, str]:
    """Every PromQL query of the dashboard, Grafana variables filled in, by where it comes from."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {
        f"panel {p['id']} ({p['title']}) {t['refId']}": t["expr"]
        for p in panels(dashboard)
        for t in p.get("targets", ())
    }
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":  # label_values(<selector>, label) is Grafana's, the selector is PromQL
            selector = re.fullmatch(r"label_values\((.+), *\w+\)", var["query"]["query"])
            assert selector, f"variable {var['name']}: not a label_values(selector, label) query"
            queries[f"variable {var['name']}"] = selector[1]
    for name, value in GRAFANA_VARIABLES.items():
        queries = {k: q.replace(name, value) for k, q in queries.items()}
    return queries


def outcome_exclusions(expr: str) -> set[str]:
    """The outcomes an `outcome!~"a|b"` matcher leaves out of an error ratio."""
    found = re.findall(r'outcome!~"([^"]+)"', expr)
    assert len(found) == 1, f"expected one outcome!~ matcher in {expr}"
    return set(found[0].split("|"))


def runtime_metric_names() -> set[str]:
    """Every metric name the runtime exposes, as Prometheus stores it, from its real collectors."""
    sample = metrics.GpuBackendSample(
        backend="cuda", requested="auto", device="0", fallback_reason="", healthy=True, health_reason="",
        mps="off", tenants=(("t", 1, 2, 3),), devices=(metrics.GpuDeviceSample(0, "gpu", 2, 1, 0.5, 40.0),),
    )  # fmt: skip
    previous = metrics.GPU_BACKEND.source
    metrics.GPU_BACKEND.source = lambda: sample  # so the NVML families are collected too
    try:
        families = list(metrics.REGISTRY.collect())
    finally:
        metrics.GPU_BACKEND.source = previous
    return {f.name + ("_total" if f.type == "counter" else "") for f in families}


def used_metric_names(exprs: list[str]) -> set[str]:
    """Metric names in PromQL, a histogram's _bucket/_sum/_count series counted as the histogram."""
    names = {m for e in exprs for m in re.findall(r"\btensorwasm_[a-z0-9_]+", e)}
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_rendered_rules_pass_promtool_check(rule_spec: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_spec))
    proc = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules(rule_spec))} rules found" in proc.stdout


def test_every_alert_fires_and_stays_quiet_in_promtool_unit_tests(
    rule_spec: dict[str, Any], tmp_path: Path
) -> None:
    cases = yaml.safe_load(CASES.read_text())
    checks = [c for t in cases["tests"] for c in t.get("alert_rule_test", ())]
    firing = {c["alertname"] for c in checks if c["exp_alerts"]}
    quiet = {c["alertname"] for c in checks if not c["exp_alerts"]}
    alerts = set(alert_rules(rule_spec))
    assert alerts - firing == set(), "alerts with no firing case in test_alerts_cases.yaml"
    assert alerts - quiet == set(), "alerts with no quiet case in test_alerts_cases.yaml"
    assert (firing | quiet) - alerts == set(), "cases for alerts the chart does not have"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_spec))
    shutil.copy(CASES, tmp_path / CASES.name)
    proc = promtool("test", "rules", CASES.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    # promtool parses rule expressions with Prometheus' own PromQL parser: one recording rule per query.
    rules = [{"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries.values())]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    proc = promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\nqueries: {json.dumps(queries, indent=1)}"


def test_dashboard_uses_only_metrics_the_runtime_exports() -> None:
    used = used_metric_names(list(dashboard_queries().values()))
    exported = runtime_metric_names()
    assert used - exported == set(), "on the dashboard, not exported by runtime/tensorwasm/runtime/metrics.py"
    assert exported - used == set(NOT_ON_DASHBOARD), (
        "runtime metrics neither on the dashboard nor in NOT_ON_DASHBOARD (or listed there but plotted)"
    )


def test_dashboard_error_ratio_and_error_alert_leave_out_exactly_the_4xx_kinds(
    rule_spec: dict[str, Any],
) -> None:
    client_side = {
        c.kind
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.RuntimeFault) and c is not errors.RuntimeFault
        if c.status < 500
    }
    assert {"queue_full", "overloaded", "bad_request"} <= client_side
    alert = alert_rules(rule_spec)["TensorWasmTenantInvokeErrors"]["expr"]
    [ratio] = [q for k, q in dashboard_queries().items() if "(Server error ratio)" in k]
    assert outcome_exclusions(alert) == outcome_exclusions(ratio) == {"ok"} | client_side


def test_dashboard_error_ratio_evaluates_like_the_alert(tmp_path: Path) -> None:
    """On the alert's error case: 10% for tenant a, and 0 (not "No data") for b, whose failures are 4xx."""
    [ratio] = [q for k, q in dashboard_queries().items() if "(Server error ratio)" in k]
    cases = yaml.safe_load(CASES.read_text())
    [errors_case] = [
        t for t in cases["tests"]
        if any(c["alertname"] == "TensorWasmTenantInvokeErrors" for c in t.get("alert_rule_test", ()))
    ]  # fmt: skip
    checks = [
        {"expr": ratio.replace('tenant=~".*"', f'tenant=~"{tenant}"'), "eval_time": "15m",
         "exp_samples": [{"labels": "{}", "value": value}]}
        for tenant, value in (("a", 0.1), ("b", 0))
    ]  # fmt: skip
    test = {"interval": "1m", "input_series": errors_case["input_series"], "promql_expr_test": checks}
    (tmp_path / "empty.yaml").write_text("groups: []\n")
    (tmp_path / "ratio.yaml").write_text(yaml.safe_dump({"rule_files": ["empty.yaml"], "tests": [test]}))
    proc = promtool("test", "rules", "ratio.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
