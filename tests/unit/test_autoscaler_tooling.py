"""The pure parts of the dev cluster's autoscalers: KEDA's trim, its manifests' changes, the stand-in
custom metrics API's answers. (Running them: tests/cluster/test_autoscalers.py.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tensorwasm.dev import autoscalers

HACK = Path(__file__).resolve().parents[2] / "hack"

SWITCH = """func buildScaler(triggerType string) (scalers.Scaler, error) {
\t// TRIGGERS-START
\tswitch triggerType {
\tcase "activemq":
\t\treturn scalers.NewActiveMQScaler(config)
\tcase "cpu":
\t\treturn scalers.NewCPUMemoryScaler(corev1.ResourceCPU, config)
\tcase "prometheus":
\t\treturn scalers.NewPrometheusScaler(config)
\tcase "redis":
\t\treturn scalers.NewRedisScaler(ctx, false, false, config)
\tdefault:
\t\treturn nil, fmt.Errorf("no scaler found for type: %s", triggerType)
\t}
\t// TRIGGERS-END
}
"""


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_keda_trim_keeps_only_the_named_triggers_and_the_default() -> None:
    trim = load(HACK / "controlplane" / "keda_scalers.py")
    out = trim.trim_switch(SWITCH, ("prometheus", "cpu"))
    assert 'case "prometheus"' in out and 'case "cpu"' in out and "default:" in out
    assert "activemq" not in out and "Redis" not in out
    with pytest.raises(SystemExit, match="changed shape"):
        trim.trim_switch(SWITCH, ("prometheus", "kafka"))  # a trigger the source no longer has


def test_keda_manifests_run_the_local_image_on_the_real_node_with_the_operator_by_ip() -> None:
    def deployment(name: str) -> dict[str, Any]:
        container = {"name": name, "image": "ghcr.io/x", "args": ["--a"]}
        return {"kind": "Deployment", "metadata": {"name": name},
                "spec": {"template": {"spec": {"containers": [container]}}}}  # fmt: skip

    docs = [deployment("keda-operator"), deployment("keda-metrics-apiserver")]
    docs.append({"kind": "Service", "metadata": {"name": "keda-operator"}})
    out = autoscalers.adapt_keda_manifests(docs, "tensorwasm.io/keda:abc", "10.96.0.7")
    operator, adapter, service = out
    assert service == docs[2]
    for d in (operator, adapter):
        spec = d["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == autoscalers.ON_REAL_NODE["nodeSelector"]
        assert spec["containers"][0]["image"] == "tensorwasm.io/keda:abc"
        assert spec["containers"][0]["imagePullPolicy"] == "Never"
    assert operator["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "--a",
        "--enable-webhook-patching=false",
    ]
    assert (
        "--metrics-service-address=10.96.0.7:9666"
        in adapter["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert docs[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/x", "input left alone"


def test_custom_metrics_answers_only_pods_with_series_as_quantities() -> None:
    cm = load(HACK / "autoscaling" / "custom_metrics.py")
    answer = cm.build_value_list(
        "tw", "tensorwasm_queue_depth", {"s-0": 4.0, "s-1": 1.5}, ["s-1", "s-0", "new"]
    )
    assert [(i["describedObject"]["name"], i["value"]) for i in answer["items"]] == [
        ("s-0", "4"),
        ("s-1", "1500m"),
    ]
    assert answer["apiVersion"] == "custom.metrics.k8s.io/v1beta2"
    assert (
        cm.build_resource_list(["tensorwasm_queue_depth"])["resources"][0]["name"]
        == "pods/tensorwasm_queue_depth"
    )
    assert autoscalers.parse_quantity("1500m") == 1.5 and autoscalers.parse_quantity("4") == 4.0


def test_custom_metrics_objects_register_the_apiservice_with_its_ca() -> None:
    objs = autoscalers.build_custom_metrics_objects(
        "http://10.96.0.9:9090", "img", "print()", ("CA", "CRT", "KEY")
    )
    [api] = [o for o in objs if o["kind"] == "APIService"]
    assert api["metadata"]["name"] == autoscalers.CUSTOM_METRICS_APISERVICE
    assert api["spec"]["caBundle"] == "Q0E=" and "insecureSkipTLSVerify" not in api["spec"]
    [deploy] = [o for o in objs if o["kind"] == "Deployment"]
    command = deploy["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[2:4] == ["http://10.96.0.9:9090", "tensorwasm_queue_depth"]
