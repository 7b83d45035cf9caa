"""Proof that the local control plane is a real one: schema validation, controllers, kwok, GC."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Kube, wait_for

PROOF_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.proof.tensorwasm.io
spec:
  group: proof.tensorwasm.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1, maximum: 10}
"""


@pytest.fixture(scope="module")
def proof_crd(kube: Kube) -> str:
    kube.kubectl("apply", "-f", "-", input_text=PROOF_CRD)
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/widgets.proof.tensorwasm.io")
    return "widgets.proof.tensorwasm.io"


def test_custom_resource_breaking_schema_is_refused_with_apiserver_message(
    kube: Kube, namespace: str, proof_crd: str
) -> None:
    bad = '{"apiVersion":"proof.tensorwasm.io/v1","kind":"Widget","metadata":{"name":"w"},"spec":{"size":99}}'
    proc = kube.run_kubectl("apply", "-n", namespace, "-f", "-", input_text=bad)
    assert proc.returncode != 0
    assert 'The Widget "w" is invalid' in proc.stderr
    assert "spec.size: Invalid value: 99: spec.size in body should be less than or equal to 10" in proc.stderr

    good = bad.replace('"size":99', '"size":3')
    kube.kubectl("apply", "-n", namespace, "-f", "-", input_text=good)
    assert kube.kubectl("get", "widget", "w", "-n", namespace, "-o", "jsonpath={.spec.size}") == "3"


def test_statefulset_pods_become_running_through_kwok(kube: Kube, namespace: str) -> None:
    sts = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "shard"},
        "spec": {
            "replicas": 2,
            "serviceName": "shard",
            "selector": {"matchLabels": {"app": "shard"}},
            "template": {
                "metadata": {"labels": {"app": "shard"}},
                "spec": {"containers": [{"name": "runtime", "image": "example.invalid/runtime:0"}]},
            },
        },
    }
    kube.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(sts))

    def running() -> list[str]:
        out = kube.kubectl("get", "pods", "-n", namespace, "-o", "json")
        pods = json.loads(out)["items"]
        phases = {p["metadata"]["name"]: p["status"].get("phase") for p in pods}
        return sorted(phases) if phases == {"shard-0": "Running", "shard-1": "Running"} else []

    assert wait_for(running, 90, "both StatefulSet pods Running") == ["shard-0", "shard-1"]
    node = kube.kubectl("get", "pod", "shard-0", "-n", namespace, "-o", "jsonpath={.spec.nodeName}")
    assert node.startswith("tensorwasm-node-")


def test_deleting_an_owner_garbage_collects_its_dependents(kube: Kube, namespace: str) -> None:
    kube.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = kube.kubectl("get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}")
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    kube.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(dependent))
    kube.kubectl("delete", "configmap", "owner", "-n", namespace)

    def gone() -> bool:
        proc = kube.run_kubectl("get", "configmap", "dependent", "-n", namespace)
        return proc.returncode != 0 and "NotFound" in proc.stderr

    assert wait_for(gone, 60, "the garbage collector to delete the dependent")


def test_kubectl_get_works_with_the_written_kubeconfig(kube: Kube) -> None:
    text = kube.kubeconfig.read_text()
    assert "127.0.0.1" in text and "certificate-authority-data" in text
    nodes = kube.kubectl("get", "nodes", "-o", "name").split()
    kwok = ["node/tensorwasm-node-0", "node/tensorwasm-node-1", "node/tensorwasm-node-2"]
    # The real node too, unless TENSORWASM_TEST_REAL_NODE=0.
    assert nodes in (kwok, [*kwok, "node/tensorwasm-real"])
    assert "Kubernetes control plane is running" in kube.kubectl("cluster-info")
    version = json.loads(kube.kubectl("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == "v1.37.2"
