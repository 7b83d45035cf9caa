"""The MutatingAdmissionPolicy (and its binding) that puts the operator's finalizer on every new
Tenant of one namespace at CREATE, so the operator does not spend a PATCH per Tenant adding it.

Pure; must not import kopf or kube/. The Helm chart renders the same two objects
(templates/tenant-finalizer-policy.yaml; a chart test keeps them equal) and the local dev stack
applies them. The operator still adds the finalizer itself when it is missing (no policy served,
Tenants created before the policy): failurePolicy Ignore relies on that.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tensorwasm.api.group import FINALIZER, GROUP, TENANT
from tensorwasm.operator.desired.meta import LABEL_COMPONENT, LABEL_NAME

POLICY_API_VERSION = "admissionregistration.k8s.io/v1"
COMPONENT = "tenant-finalizer"
LABEL_PART_OF = "app.kubernetes.io/part-of"
# Set by the API server on every namespace (v1.21+): selects exactly one namespace by name.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def finalizer_policy_name(namespace: str) -> str:
    """One name per namespace: releases in two namespaces never share a cluster-scoped object."""
    if not _NAMESPACE.fullmatch(namespace):
        raise ValueError(f"namespace {namespace!r} is not a valid namespace name (RFC 1123 label)")
    return f"tensorwasm-{COMPONENT}-{namespace}"


def policy_labels() -> dict[str, str]:
    return {LABEL_NAME: "tensorwasm", LABEL_COMPONENT: COMPONENT, LABEL_PART_OF: "tensorwasm"}


def build_finalizer_policy(namespace: str) -> dict[str, Any]:
    """Adds FINALIZER to Tenants created in `namespace` only: a Tenant where no operator watches
    would never lose it and could never be deleted. The apply merges it into any finalizers the
    Tenant already lists (metadata.finalizers is a set). Ignore on failure: the operator adds it."""
    expression = f"Object{{metadata: Object.metadata{{finalizers: [{json.dumps(FINALIZER)}]}}}}"
    return {
        "apiVersion": POLICY_API_VERSION,
        "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": finalizer_policy_name(namespace), "labels": policy_labels()},
        "spec": {
            "matchConstraints": {
                "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}},
                "resourceRules": [
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": ["*"],
                        "operations": ["CREATE"],
                        "resources": [TENANT.plural],
                    }
                ],
            },
            "failurePolicy": "Ignore",
            "reinvocationPolicy": "Never",
            "mutations": [
                {"patchType": "ApplyConfiguration", "applyConfiguration": {"expression": expression}}
            ],
        },
    }


def build_finalizer_binding(namespace: str) -> dict[str, Any]:
    """Binds the policy with no further selection: the policy's namespaceSelector scopes it."""
    name = finalizer_policy_name(namespace)
    return {
        "apiVersion": POLICY_API_VERSION,
        "kind": "MutatingAdmissionPolicyBinding",
        "metadata": {"name": name, "labels": policy_labels()},
        "spec": {"policyName": name},
    }
