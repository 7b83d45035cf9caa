"""The chart's two autoscaler paths: autoscaling.provider hpa (an HPA) or keda (a KEDA ScaledObject).

Covers: exactly one autoscaler per provider; the ScaledObject targets the StatefulSet the operator
builds, and its Prometheus trigger's query parses and sums the shards' queue depths when promtool
evaluates it; a server-side dry-run where keda.sh is served (skipped otherwise, as the
ServiceMonitor's). Both paths scaling a real StatefulSet: tests/cluster/test_autoscalers.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tensorwasm.operator.settings import load_settings

from .test_helm import by_kind, helm, one, operator_env, render

KEDA = ("autoscaling.enabled=true", "autoscaling.provider=keda")


@pytest.mark.parametrize(
    ("sets", "kinds"),
    [
        ((), set()),
        (("autoscaling.enabled=true",), {"HorizontalPodAutoscaler"}),
        (KEDA, {"ScaledObject"}),
    ],
    ids=["off", "hpa-by-default", "keda"],
)
def test_each_provider_renders_exactly_one_autoscaler(
    kube: Any, sets: tuple[str, ...], kinds: set[str]
) -> None:
    docs = render(kube, *sets)
    rendered = {d["kind"] for d in docs} & {"HorizontalPodAutoscaler", "ScaledObject"}
    assert rendered == kinds


def test_unknown_provider_and_inverted_bounds_are_refused(kube: Any) -> None:
    args = ["template", "t", str(Path(__file__).parents[2] / "helm" / "tensorwasm")]
    bad = helm(kube, *args, "--set", "autoscaling.enabled=true,autoscaling.provider=kedaa", check=False)
    assert bad.returncode != 0 and "value must be one of 'hpa', 'keda'" in bad.stderr
    sets = "autoscaling.enabled=true,autoscaling.provider=keda,autoscaling.minReplicas=5,"
    sets += "autoscaling.maxReplicas=2"
    inverted = helm(kube, *args, "--set", sets, check=False)
    assert inverted.returncode != 0 and "must not exceed autoscaling.maxReplicas" in inverted.stderr


def test_scaledobject_scales_the_operators_statefulset_on_the_summed_queue_depth(
    kube: Any, tmp_path: Path
) -> None:
    docs = render(kube, *KEDA, "shard.name=gpu-shard", "autoscaling.targetAverageValue=6", namespace="tw")
    settings = load_settings({**operator_env(docs), "POD_NAMESPACE": "tw"})
    spec = one(docs, "ScaledObject")["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": settings.shard_name,
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 8)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilizationWindowSeconds"
    ]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["threshold"] == "6"
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed: `make deps`")
    # Two shards of this release (4 + 8 queued) and one of another release: KEDA would read 12.
    series = [
        ('tensorwasm_queue_depth{namespace="tw", job="gpu-shard", pod="gpu-shard-0", tenant="a"}', "4x5"),
        ('tensorwasm_queue_depth{namespace="tw", job="gpu-shard", pod="gpu-shard-1", tenant="b"}', "8x5"),
        ('tensorwasm_queue_depth{namespace="tw", job="other", pod="other-0", tenant="c"}', "100x5"),
    ]
    test = {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series],
        "promql_expr_test": [
            {
                "expr": trigger["metadata"]["query"],
                "eval_time": "2m",
                "exp_samples": [{"labels": "{}", "value": 12}],
            }
        ],
    }
    (tmp_path / "empty.yaml").write_text("groups: []\n")
    (tmp_path / "query.yaml").write_text(yaml.safe_dump({"rule_files": ["empty.yaml"], "tests": [test]}))
    proc = subprocess.run(
        ["promtool", "test", "rules", "query.yaml"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_custom_query_and_server_pass_through(kube: Any) -> None:
    docs = render(
        kube, *KEDA, "autoscaling.keda.serverAddress=http://prom.mon:9090",
        "autoscaling.keda.query=max(tensorwasm_queue_depth)", "autoscaling.keda.pollingInterval=5",
    )  # fmt: skip
    spec = one(docs, "ScaledObject")["spec"]
    assert spec["pollingInterval"] == 5
    assert spec["triggers"][0]["metadata"] == {
        "serverAddress": "http://prom.mon:9090", "query": "max(tensorwasm_queue_depth)", "threshold": "8",
    }  # fmt: skip


def test_scaledobject_passes_server_side_dry_run_where_keda_is_served(kube: Any, namespace: str) -> None:
    if not kube.kubectl("api-resources", "--api-group=keda.sh", "-o", "name").strip():
        pytest.skip(
            "keda.sh is not served here (KEDA not installed): the ScaledObject is checked by render only"
        )
    docs = by_kind(render(kube, *KEDA, namespace=namespace), "ScaledObject")
    proc = kube.run_kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", "-",
        input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
