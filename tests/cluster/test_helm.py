"""The Helm chart (helm/tensorwasm) against the real helm binary and the real API server.

Covers: lint, the schema's refusals, rendering with every feature, a server-side dry-run of every
rendered object, the chart's contract with the operator (its settings parser and shard builders),
the runtime's metric names and error kinds, and a real install/uninstall whose pods kwok runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tensorwasm.api.names import tenant_service_name, token_secret_name
from tensorwasm.operator.desired.admission import build_finalizer_binding, build_finalizer_policy
from tensorwasm.operator.desired.shards import build_shard_service
from tensorwasm.operator.settings import load_settings
from tensorwasm.runtime import errors, metrics
from tests import chart
from tests.chart import set_args

from .conftest import kube_json, wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "tensorwasm"
RELEASE = "tensorwasm"
EVERYTHING = [
    "crds.enabled=true",
    "monitoring.enabled=true",
    "autoscaling.enabled=true",
    "mps.enabled=true",
    "shard.gpus=1",
    "str:shard.nodeSelector.nvidia\\.com/gpu\\.present=true",
]
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule", "PodMonitor"}
MAP_API = "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy"
FINALIZER_POLICY_KINDS = {"MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding"}


def helm(kube: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(kube.bin_dir / "helm"), *args],
        env=kube.env,
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def render(
    kube: Any, *sets: str, namespace: str = "tw-chart", extra: tuple[str, ...] = (), only: str = ""
) -> list[dict[str, Any]]:
    """The chart's objects (tests/chart.py) with the session's helm."""
    helm_bin = kube.bin_dir / "helm"
    return chart.render(helm_bin, *sets, namespace=namespace, extra=extra, only=only, env=kube.env)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


def operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


# --- the chart as files ---------------------------------------------------------------------------


def test_chart_crds_are_a_byte_copy_of_the_repository_crds() -> None:
    source = {p.name: p.read_bytes() for p in sorted((REPO / "crds").glob("tensorwasm.io_*.yaml"))}
    copy = {p.name: p.read_bytes() for p in sorted((CHART / "files" / "crds").glob("*.yaml"))}
    assert source, "no CRDs in crds/"
    assert copy == source, "helm/tensorwasm/files/crds differs from crds/: run `make helm-sync`"


def _schema_leaves(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, sub in schema.get("properties", {}).items():
        if "properties" in sub:
            yield from _schema_leaves(sub, (*path, key))
        else:
            yield (*path, key)


def _commented_keys(text: str) -> dict[tuple[str, ...], bool]:
    """Every key path in values.yaml -> whether a comment line sits right above it."""
    found: dict[tuple[str, ...], bool] = {}
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in text.splitlines():
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if match and not line.lstrip().startswith("-"):
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, match.group(2)))
            found[tuple(k for _, k in stack)] = previous.lstrip().startswith("#")
        if line.strip():
            previous = line
    return found


def test_every_value_is_commented_and_covered_by_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values_text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(values_text)
    commented = _commented_keys(values_text)
    leaves = [leaf for leaf in _schema_leaves(schema) if leaf != ("global",)]
    assert len(leaves) > 60
    for leaf in leaves:
        node: Any = values
        for key in leaf:
            assert isinstance(node, dict) and key in node, (
                f"schema has {'.'.join(leaf)}, values.yaml does not"
            )
            node = node[key]
        assert commented.get(leaf), f"values.yaml: {'.'.join(leaf)} has no comment above it"

    def walk(value: Any, sub: dict[str, Any], path: str) -> None:
        if "properties" not in sub:
            return  # a free-form value (resources, affinity, ...): its schema type is checked by helm
        assert sub.get("additionalProperties") is False, f"{path or '<root>'}: typos must be refused"
        for key, child in value.items():
            assert key in sub["properties"], f"values.yaml has {path}{key}, the schema does not"
            walk(child, sub["properties"][key], f"{path}{key}.")

    walk(values, schema, "")


# --- lint and schema ------------------------------------------------------------------------------


@pytest.mark.parametrize("sets", [[], [*EVERYTHING, "monitoring.force=true"]], ids=["defaults", "everything"])
def test_helm_lint_strict_is_clean(kube: Any, sets: list[str]) -> None:
    proc = helm(kube, "lint", "--strict", str(CHART), *set_args(sets))
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("shard.replicas=-1", "at '/shard/replicas': minimum: got -1, want 1"),
        ("shard.capacity.smPercent=150", "at '/shard/capacity/smPercent': maximum: got 150, want 100"),
        ("shard.capacity.gpuMemory=lots", "at '/shard/capacity/gpuMemory': 'lots' does not match pattern"),
        ("shard.gpus=17", "at '/shard/gpus': maximum: got 17, want 16"),
        ("shard.name=Shard_A", "at '/shard/name': 'Shard_A' does not match pattern"),
        ("shard.replica=3", "at '/shard': additional properties 'replica' not allowed"),
        ("operator.logLevel=LOUD", "at '/operator/logLevel': value must be one of"),
        ("image.pullPolicy=Sometimes", "at '/image/pullPolicy': value must be one of"),
        ("mps.pipeDir=relative/dir", "at '/mps/pipeDir': 'relative/dir' does not match pattern"),
        ("monitoring.rules.errorRatio=2", "at '/monitoring/rules/errorRatio': maximum: got 2, want 1"),
        ("monitoring.serviceMonitor.interval=often", "at '/monitoring/serviceMonitor/interval'"),
        ("autoscaling.maxReplicas=0", "at '/autoscaling/maxReplicas': minimum: got 0, want 1"),
        ("admission.finalizerPolicy=yes", "at '/admission/finalizerPolicy': got string, want boolean"),
        ("shard.snapshots.signing.mode=always", "at '/shard/snapshots/signing/mode': value must be one of"),
        ("shard.snapshots.signing.mode=require", "at '/shard/snapshots/signing/existingSecret': minLength"),
        ("shard.idle.prewarmTenants=-1", "at '/shard/idle/prewarmTenants': minimum: got -1, want 0"),
        ("shard.handoffMaxSeconds=30", "at '/shard/handoffMaxSeconds': minimum: got 30, want 45"),
    ],
)
def test_schema_refuses_bad_values_with_a_readable_message(kube: Any, value: str, message: str) -> None:
    proc = helm(kube, "template", RELEASE, str(CHART), "--set", value, check=False)
    assert proc.returncode != 0, f"--set {value} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr, proc.stderr


def test_autoscaling_bounds_are_checked_together(kube: Any) -> None:
    sets = ["autoscaling.enabled=true", "autoscaling.minReplicas=5", "autoscaling.maxReplicas=2"]
    proc = helm(kube, "template", RELEASE, str(CHART), *set_args(sets), check=False)
    assert proc.returncode != 0
    assert "autoscaling.minReplicas (5) must not exceed autoscaling.maxReplicas (2)" in proc.stderr


def test_shards_without_a_service_account_are_refused(kube: Any) -> None:
    proc = helm(
        kube, "template", RELEASE, str(CHART), "--set", "shard.serviceAccount.create=false", check=False
    )
    assert proc.returncode != 0
    assert "shard.serviceAccount.create=false needs shard.serviceAccount.name" in proc.stderr


def test_helm_install_refuses_a_bad_value_before_creating_anything(kube: Any, namespace: str) -> None:
    proc = helm(
        kube, "install", RELEASE, str(CHART), "-n", namespace, "--set", "crds.enabled=false",
        "--set", "shard.capacity.smPercent=150", check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "at '/shard/capacity/smPercent': maximum: got 150, want 100" in proc.stderr
    assert helm(kube, "list", "-n", namespace, "-q").stdout.strip() == ""


# --- rendering ------------------------------------------------------------------------------------


def test_crds_render_from_the_copy_and_follow_enabled_and_keep(kube: Any) -> None:
    sources = {
        d["metadata"]["name"]: d
        for d in (yaml.safe_load(p.read_text()) for p in sorted((REPO / "crds").glob("tensorwasm.io_*.yaml")))
    }
    rendered = by_kind(render(kube), "CustomResourceDefinition")
    assert sorted(c["metadata"]["name"] for c in rendered) == sorted(sources)
    for crd in rendered:
        meta = crd["metadata"]
        assert meta["annotations"]["helm.sh/resource-policy"] == "keep"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        stripped = {**crd, "metadata": {k: v for k, v in meta.items() if k not in ("labels", "annotations")}}
        assert stripped == sources[meta["name"]], f"{meta['name']} changed on its way through the chart"
    for crd in by_kind(render(kube, "crds.keep=false"), "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})
    assert not by_kind(render(kube, "crds.enabled=false"), "CustomResourceDefinition")


def test_monitoring_objects_follow_the_api_and_the_switches(kube: Any) -> None:
    def kinds(*sets: str, extra: tuple[str, ...] = ()) -> set[str]:
        return {d["kind"] for d in render(kube, *sets, extra=extra)}

    no_api = kinds()
    assert "ConfigMap" in no_api and not no_api & PROMETHEUS_OPERATOR_KINDS
    assert kinds(extra=("--api-versions", "monitoring.coreos.com/v1")) >= PROMETHEUS_OPERATOR_KINDS
    assert kinds("monitoring.force=true") >= PROMETHEUS_OPERATOR_KINDS
    assert "PrometheusRule" not in kinds("monitoring.force=true", "monitoring.rules.enabled=false")
    off = kinds("monitoring.enabled=false", extra=("--api-versions", "monitoring.coreos.com/v1"))
    assert not off & (PROMETHEUS_OPERATOR_KINDS | {"ConfigMap"})
    assert not {"HorizontalPodAutoscaler", "DaemonSet"} & no_api  # off by default


def _without_labels(obj: dict[str, Any]) -> dict[str, Any]:
    return {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "labels"}}


def test_finalizer_policy_is_what_the_operator_builder_builds(kube: Any) -> None:
    docs = render(kube, namespace="prod", extra=("--api-versions", MAP_API))
    rendered = {d["kind"]: d for d in docs if d["kind"] in FINALIZER_POLICY_KINDS}
    built = {d["kind"]: d for d in (build_finalizer_policy("prod"), build_finalizer_binding("prod"))}
    assert set(rendered) == FINALIZER_POLICY_KINDS
    for kind, want in built.items():
        got = rendered[kind]
        # Modulo the chart's own labels (release, chart version): the builder's are a subset.
        assert want["metadata"]["labels"].items() <= got["metadata"]["labels"].items(), kind
        assert _without_labels(got) == _without_labels(want), f"{kind} differs from desired/admission.py"


def test_finalizer_policy_follows_its_value_and_the_api(kube: Any) -> None:
    def kinds(*sets: str, extra: tuple[str, ...] = ()) -> set[str]:
        return {d["kind"] for d in render(kube, *sets, extra=extra)} & FINALIZER_POLICY_KINDS

    assert kinds(extra=("--api-versions", MAP_API)) == FINALIZER_POLICY_KINDS  # on by default
    assert not kinds("admission.finalizerPolicy=false", extra=("--api-versions", MAP_API))
    assert not kinds()  # an API server that does not serve it: the operator adds the finalizer


def test_operator_env_is_what_the_operator_settings_parser_reads(kube: Any) -> None:
    docs = render(
        kube, "shard.replicas=3", "shard.gpus=1", "shard.capacity.gpuMemory=20Gi",
        "shard.capacity.smPercent=25", "shard.capacity.hostMemory=64Gi", "shard.capacity.maxTenants=12",
        "shard.name=gpu-shard",
        "str:shard.nodeSelector.nvidia\\.com/gpu\\.present=true", "shard.tolerations[0].key=nvidia.com/gpu",
        "shard.tolerations[0].operator=Exists", "shard.tolerations[0].effect=NoSchedule",
        "image.tag=1.2.3", "shard.image.repository=registry.local/tw", "operator.logLevel=DEBUG",
        "shard.audit.log=file", "shard.audit.existingClaim=tw-audit", "shard.idle.prewarmTenants=9",
        "shard.handoffMaxSeconds=900",
        namespace="prod",
    )  # fmt: skip
    env = operator_env(docs)
    # load_settings refuses a TENSORWASM_OPERATOR_* variable it does not read: every rendered one is used.
    settings = load_settings({**env, "POD_NAMESPACE": "prod"})  # the Downward API fills POD_NAMESPACE
    shard_sa = one(
        [d for d in by_kind(docs, "ServiceAccount") if "shard" in d["metadata"]["name"]], "ServiceAccount"
    )
    assert settings.namespace == "prod"
    assert settings.standalone is True
    assert (settings.shards, settings.shard_name, settings.shard_gpus) == (3, "gpu-shard", 1)
    cap = settings.shard_capacity
    assert (cap.gpu_memory_bytes, cap.sm_percent, cap.host_memory_bytes, cap.max_tenants) == (
        20 << 30, 25, 64 << 30, 12,
    )  # fmt: skip
    assert settings.shard_node_selector == {"nvidia.com/gpu.present": "true"}
    assert settings.shard_tolerations == (
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    )
    assert settings.shard_service_account == shard_sa["metadata"]["name"]
    assert settings.image == "registry.local/tw:1.2.3"
    assert settings.log_level == "DEBUG"
    assert (settings.shard_audit_log, settings.shard_audit_claim) == ("file", "tw-audit")
    assert settings.shard_prewarm_tenants == 9
    assert settings.shard_handoff_max_s == 900
    deployment = one(docs, "Deployment")
    # Two replicas elect a leader on a Lease the operator's Role may renew; without election, one.
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert settings.leader_election_lease == deployment["metadata"]["name"]
    assert settings.lease_retry_s < settings.renew_deadline_s < settings.lease_duration_s
    role = next(r for r in by_kind(docs, "Role") if r["metadata"]["name"] == deployment["metadata"]["name"])
    lease_rules = [r for r in role["rules"] if r["apiGroups"] == ["coordination.k8s.io"]]
    assert {"resourceNames": [settings.leader_election_lease]}.items() <= lease_rules[1].items()
    single = one(render(kube, "operator.leaderElection.enabled=false", "operator.replicas=3"), "Deployment")
    assert single["spec"]["replicas"] == 1 and single["spec"]["strategy"]["type"] == "Recreate"
    assert "TENSORWASM_OPERATOR_LEADER_ELECTION_LEASE" not in operator_env([single])
    assert (
        deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        == "ghcr.io/tensorwasm/tensorwasm:1.2.3"
    )


def test_servicemonitor_and_hpa_point_at_what_the_operator_builds(kube: Any) -> None:
    docs = render(kube, "autoscaling.enabled=true", "monitoring.force=true", "shard.name=gpu-shard")
    settings = load_settings({**operator_env(docs), "POD_NAMESPACE": "tw-chart"})
    service = build_shard_service(settings)  # the operator's own builder of the scraped Service
    monitor = one(docs, "ServiceMonitor")["spec"]
    assert monitor["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    selector = monitor["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["endpoints"]] == ["admin"] and "admin" in port_names
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": settings.shard_name,
    }
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "tensorwasm_queue_depth"


def _runtime_metric_series() -> set[str]:
    """Every series name the runtime can expose, from its real collectors."""
    sample = metrics.GpuBackendSample(
        backend="cuda", requested="auto", device="0", fallback_reason="", healthy=True, health_reason="",
        mps="off", tenants=(("t", 1, 2, 3),),
        devices=(metrics.GpuDeviceSample(0, "gpu", 2, 1, 0.5, 40.0),),
    )  # fmt: skip
    previous = metrics.GPU_BACKEND.source
    metrics.GPU_BACKEND.source = lambda: sample  # so the NVML families are collected too
    try:
        families = list(metrics.REGISTRY.collect())
    finally:
        metrics.GPU_BACKEND.source = previous
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {f.name + s for f in families for s in suffixes.get(f.type, ("",))}


def test_alerts_and_dashboard_use_real_metric_names_and_error_kinds(kube: Any) -> None:
    docs = render(kube, "monitoring.force=true")
    rule = one(docs, "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "TensorWasmShardNotReady", "TensorWasmTenantQueueSaturated",
        "TensorWasmTenantGpuMemoryNearCap", "TensorWasmTenantInvokeErrors",
    } <= set(alerts)  # fmt: skip
    dashboard = json.loads(one(docs, "ConfigMap")["data"]["tensorwasm.json"])
    dashboard_exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs = [r["expr"] for r in alerts.values()] + dashboard_exprs
    used = {m for e in exprs for m in re.findall(r"\btensorwasm_[a-z0-9_]+", e)}
    known = _runtime_metric_series()
    assert len(used) >= 10
    assert used <= known, f"not exposed by runtime/tensorwasm/runtime/metrics.py: {sorted(used - known)}"
    kinds = {
        c.kind for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.RuntimeFault)
    }
    outcomes = {
        o for e in exprs for group in re.findall(r'outcome[!=]~?"([^"]+)"', e) for o in group.split("|")
    }
    assert "queue_full" in outcomes
    assert outcomes - {"ok"} <= kinds, f"not error kinds in errors.py: {sorted(outcomes - {'ok'} - kinds)}"
    # Prometheus templates reach the alert text intact, not eaten by Helm.
    assert "{{ $labels.tenant }}" in alerts["TensorWasmTenantQueueSaturated"]["annotations"]["description"]


def test_mps_daemonset_runs_the_control_daemon_on_gpu_nodes(kube: Any) -> None:
    docs = render(kube, "mps.enabled=true", "mps.pipeDir=/var/run/mps")
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["nvidia-cuda-mps-control", "-f"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["hostIPC"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/var/run/mps"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert mounts["pipe"] == paths["pipe"] == "/var/run/mps"
    assert "nvidia.com/gpu" not in json.dumps(container.get("resources", {}))  # takes no GPU from shards
    assert operator_env(docs)["TENSORWASM_OPERATOR_SHARD_MPS_PIPE_DIR"] == "/var/run/mps"


# --- the real API server --------------------------------------------------------------------------


def _served(kube: Any, group: str) -> bool:
    return bool(kube.kubectl("api-resources", f"--api-group={group}", "-o", "name").strip())


@pytest.mark.parametrize("sets", [[], EVERYTHING], ids=["defaults", "everything"])
def test_rendered_objects_pass_server_side_dry_run(kube: Any, namespace: str, sets: list[str]) -> None:
    extra = ("--api-versions", "monitoring.coreos.com/v1", "--api-versions", MAP_API)
    docs = render(kube, *sets, namespace=namespace, extra=extra)
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
    } <= kinds
    assert {"CustomResourceDefinition", "ConfigMap"} | PROMETHEUS_OPERATOR_KINDS <= kinds
    assert kinds >= FINALIZER_POLICY_KINDS
    if sets:
        assert {"HorizontalPodAutoscaler", "DaemonSet"} <= kinds
    skipped: set[str] = set()
    if not _served(kube, "monitoring.coreos.com"):
        # The test control plane has no prometheus-operator CRDs: the API server cannot check these
        # two kinds (their contents are checked against the runtime's metrics above instead).
        skipped = PROMETHEUS_OPERATOR_KINDS
        print(f"Skipped in the dry-run (monitoring.coreos.com not served): {sorted(skipped)}")
    checked = [d for d in docs if d["kind"] not in skipped]
    proc = kube.run_kubectl(
        "apply", "--dry-run=server", "--server-side", "--force-conflicts", "--field-manager=helm-chart-test",
        "-n", namespace, "-f", "-",
        input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": checked}),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("serverside-applied (server dry run)") == len(checked), proc.stdout


def _can(kube: Any, namespace: str, account: str, *what: str) -> bool:
    user = f"system:serviceaccount:{namespace}:{account}"
    proc: subprocess.CompletedProcess[str] = kube.run_kubectl(
        "auth", "can-i", *what, "-n", namespace, f"--as={user}"
    )
    return proc.stdout.strip() == "yes"


@pytest.fixture
def release(kube: Any, namespace: str) -> Iterator[str]:
    """The release name; uninstalled afterwards even when the test fails half-way (its ClusterRole
    and ClusterRoleBinding would outlive the namespace)."""
    yield RELEASE
    if helm(kube, "status", RELEASE, "-n", namespace, check=False).returncode == 0:
        helm(kube, "uninstall", RELEASE, "-n", namespace, "--wait", "--timeout", "60s", check=False)


def test_install_runs_the_operator_with_its_rbac_and_uninstall_removes_it(
    kube: Any, namespace: str, release: str
) -> None:
    # The session applied crds/ already (tests/conftest.py): the release must not claim them.
    # No storage class here (--wait would wait for the snapshot claim to bind): the real-node test
    # (tests/node/test_chart_on_real_node.py) installs with a claim.
    sets = [
        "crds.enabled=false", "mps.enabled=true", "autoscaling.enabled=true",
        "shard.snapshots.persistence.enabled=false",
    ]  # fmt: skip
    helm(
        kube, "install", RELEASE, str(CHART), "-n", namespace, "--wait", "--timeout", "120s",
        *set_args(sets),
    )  # fmt: skip
    operator, shard = f"{RELEASE}-operator", f"{RELEASE}-shard"
    cluster_name = f"{RELEASE}-operator-{namespace}"
    deployment = kube_json(kube, "get", "deployment", operator, "-n", namespace)
    available = {c["type"]: c["status"] for c in deployment["status"]["conditions"]}
    # Two replicas (kwok runs no container: both pods are ready without electing).
    assert available.get("Available") == "True" and deployment["status"]["readyReplicas"] == 2
    gpu_nodes = len(kube_json(kube, "get", "nodes", "-l", "nvidia.com/gpu.present=true")["items"])
    assert gpu_nodes > 0

    def daemons_ready() -> dict[str, Any] | None:
        ds: dict[str, Any] = kube_json(kube, "get", "daemonset", f"{RELEASE}-mps", "-n", namespace)
        return ds if ds["status"].get("numberReady") == gpu_nodes else None

    # helm --wait accepts a DaemonSet with maxUnavailable pods not ready yet: wait for all of them.
    daemonset = wait_for(daemons_ready, 180, "MPS daemon ready on every GPU node")
    assert daemonset["status"]["desiredNumberScheduled"] == gpu_nodes
    kube_json(kube, "get", "hpa", "tensorwasm-shard", "-n", namespace)

    # RBAC as the API server evaluates it for each ServiceAccount.
    assert _can(kube, namespace, operator, "patch", "tenants.tensorwasm.io")
    assert _can(kube, namespace, operator, "patch", "tenants.tensorwasm.io", "--subresource=status")
    assert _can(kube, namespace, operator, "create", "statefulsets.apps")
    assert _can(kube, namespace, operator, "create", "secrets")
    assert _can(kube, namespace, operator, "create", "events")
    assert _can(kube, namespace, operator, "watch", "customresourcedefinitions.apiextensions.k8s.io")
    assert not _can(kube, namespace, operator, "delete", "tenants.tensorwasm.io")
    assert _can(kube, namespace, operator, "patch", f"leases.coordination.k8s.io/{operator}")  # election
    assert not _can(kube, namespace, operator, "patch", "leases.coordination.k8s.io/another-lease")
    assert _can(kube, namespace, operator, "create", "snapshots.tensorwasm.io")  # moves, Periodic
    assert _can(kube, namespace, operator, "delete", "snapshots.tensorwasm.io")  # retention
    assert not _can(kube, namespace, operator, "delete", "secrets")
    assert not _can(kube, namespace, operator, "create", "pods")
    assert not _can(kube, "default", operator, "list", "secrets")  # its own namespace only
    assert _can(kube, namespace, shard, "watch", "tenants.tensorwasm.io")
    assert _can(kube, namespace, shard, "patch", "tenants.tensorwasm.io", "--subresource=status")
    assert _can(kube, namespace, shard, "patch", "snapshots.tensorwasm.io", "--subresource=status")
    assert _can(kube, namespace, shard, "get", "configmaps")
    assert _can(kube, namespace, shard, "get", "secrets")
    assert _can(kube, namespace, shard, "watch", "snapshots.tensorwasm.io")
    assert _can(kube, namespace, shard, "patch", "snapshots.tensorwasm.io")  # the blob finalizer
    assert _can(kube, namespace, shard, "list", "pods")  # which shards are live
    assert not _can(kube, namespace, shard, "patch", "tenants.tensorwasm.io")  # spec is the user's
    assert not _can(kube, namespace, shard, "create", "snapshots.tensorwasm.io")  # the operator's
    assert not _can(kube, namespace, shard, "delete", "snapshots.tensorwasm.io")
    assert not _can(kube, namespace, shard, "create", "secrets")

    names = {
        "serviceaccount": [operator, shard],
        "role": [operator, shard],
        "rolebinding": [operator, shard],
        "clusterrole": [cluster_name],
        "clusterrolebinding": [cluster_name],
        # The API server serves MutatingAdmissionPolicy, so the release installs the policy.
        "mutatingadmissionpolicy": [f"tensorwasm-tenant-finalizer-{namespace}"],
        "mutatingadmissionpolicybinding": [f"tensorwasm-tenant-finalizer-{namespace}"],
    }
    for kind, objs in names.items():
        for name in objs:
            kube_json(kube, "get", kind, name, "-n", namespace)

    helm(kube, "uninstall", RELEASE, "-n", namespace, "--wait", "--timeout", "120s")
    for kind, objs in {**names, "deployment": [operator], "daemonset": [f"{RELEASE}-mps"]}.items():
        for name in objs:
            out = kube.kubectl("get", kind, name, "-n", namespace, "--ignore-not-found", "-o", "name")
            assert out.strip() == "", f"{kind}/{name} survived helm uninstall"
    assert _served(kube, "tensorwasm.io"), "the CRDs the release did not own must stay"


def test_selftest_hooks_name_what_the_operator_creates_and_pass_dry_run(kube: Any, namespace: str) -> None:
    docs = render(kube, namespace=namespace, only="templates/selftest-test.yaml")
    assert all(d["metadata"]["annotations"]["helm.sh/hook"] == "test" for d in docs)
    tenant = one(docs, "Tenant")
    name = tenant["metadata"]["name"]
    module = (CHART / "files" / "selftest" / "echo.wasm").read_bytes()
    assert tenant["spec"]["module"]["sha256"] == hashlib.sha256(module).hexdigest()
    assert base64.b64decode(one(docs, "ConfigMap")["binaryData"]["module.wasm"]) == module
    rules = {r["resources"][0]: r["resourceNames"] for r in one(docs, "Role")["rules"]}
    assert rules == {
        "tenants": [name],
        "services": [tenant_service_name(name)],
        "secrets": [token_secret_name(name)],
    }
    pod = one(docs, "Pod")["spec"]
    assert pod["serviceAccountName"] == name and pod["restartPolicy"] == "Never"
    assert pod["containers"][0]["args"][:2] == ["selftest", f"--tenant={name}"]
    # The API server accepts every object (the pod once its ServiceAccount exists).
    objects = [d for d in docs if d["kind"] != "Pod"]
    proc = kube.run_kubectl(
        "apply", "--server-side", "-n", namespace, "-f", "-",
        input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = kube.run_kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", "-", input_text=json.dumps(one(docs, "Pod"))
    )
    assert proc.returncode == 0, proc.stderr
