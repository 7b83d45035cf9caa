"""The finalizer MutatingAdmissionPolicy and its binding, compared by equality (no cluster)."""

from __future__ import annotations

import pytest

from tensorwasm.operator.desired.admission import (
    build_finalizer_binding,
    build_finalizer_policy,
    finalizer_policy_name,
)

LABELS = {
    "app.kubernetes.io/name": "tensorwasm",
    "app.kubernetes.io/component": "tenant-finalizer",
    "app.kubernetes.io/part-of": "tensorwasm",
}


def test_policy_adds_the_finalizer_to_tenants_created_in_one_namespace() -> None:
    assert build_finalizer_policy("prod") == {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": "tensorwasm-tenant-finalizer-prod", "labels": LABELS},
        "spec": {
            "matchConstraints": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prod"}},
                "resourceRules": [
                    {
                        "apiGroups": ["tensorwasm.io"],
                        "apiVersions": ["*"],
                        "operations": ["CREATE"],
                        "resources": ["tenants"],
                    }
                ],
            },
            "failurePolicy": "Ignore",
            "reinvocationPolicy": "Never",
            "mutations": [
                {
                    "patchType": "ApplyConfiguration",
                    "applyConfiguration": {
                        "expression": (
                            'Object{metadata: Object.metadata{finalizers: ["tensorwasm.io/finalizer"]}}'
                        )
                    },
                }
            ],
        },
    }


def test_binding_binds_the_policy_of_the_same_namespace() -> None:
    assert build_finalizer_binding("prod") == {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicyBinding",
        "metadata": {"name": "tensorwasm-tenant-finalizer-prod", "labels": LABELS},
        "spec": {"policyName": "tensorwasm-tenant-finalizer-prod"},
    }


def test_two_namespaces_get_two_distinct_objects() -> None:
    a, b = build_finalizer_policy("team-a"), build_finalizer_policy("team-b")
    assert a["metadata"]["name"] != b["metadata"]["name"]
    assert a["spec"]["matchConstraints"]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "team-a"}
    }
    assert build_finalizer_binding("team-b")["spec"]["policyName"] == b["metadata"]["name"]


def test_longest_valid_namespace_is_accepted() -> None:
    name = "a" * 63
    assert finalizer_policy_name(name) == f"tensorwasm-tenant-finalizer-{name}"


@pytest.mark.parametrize("namespace", ["", "Prod", "team_a", "-a", "a-", "a.b", "a" * 64, "prod ", "prod\n"])
def test_invalid_namespace_is_refused_with_its_name(namespace: str) -> None:
    for build in (build_finalizer_policy, build_finalizer_binding):
        with pytest.raises(ValueError, match="is not a valid namespace name") as err:
            build(namespace)
        assert repr(namespace) in str(err.value)
