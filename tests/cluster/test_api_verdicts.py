"""The API server's verdict on random Tenant specs equals the spec model's (CRD schema + CEL + strict fields).

Each example is a server-side dry-run create with strict field validation, so nothing is stored.
A disagreement prints the spec and both verdicts; the model (tensorwasm.api.tenant) generates the
CRD, so a fix is made there and `make crds` run.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings

from tensorwasm.api.fields import InvalidSpec
from tensorwasm.api.group import API_VERSION, GROUP, TENANT, VERSION
from tensorwasm.api.tenant import parse_spec
from tests.tenant_specs import tenant_specs


def server_accepts(custom: Any, namespace: str, spec: dict[str, Any]) -> tuple[bool, str]:
    from kubernetes.client.exceptions import ApiException

    body = {"apiVersion": API_VERSION, "kind": TENANT.kind, "metadata": {"name": "probe"}, "spec": spec}
    try:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, TENANT.plural, body, dry_run="All", field_validation="Strict"
        )
    except ApiException as exc:
        if exc.status not in (400, 422):  # refusals; anything else is a broken test, not a verdict
            raise
        return False, str(json.loads(exc.body).get("message", exc.body))
    return True, ""


def model_accepts(spec: dict[str, Any]) -> tuple[bool, str]:
    try:
        parse_spec(spec)
    except InvalidSpec as exc:
        return False, str(exc)
    return True, ""


def test_the_api_server_and_the_model_agree_on_every_spec(kube: Any, namespace: str) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(kube.api_client())

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(tenant_specs())
    def agree(spec: dict[str, Any]) -> None:
        server, model = server_accepts(custom, namespace, spec), model_accepts(spec)
        assert server[0] == model[0], f"server={server} model={model} spec={spec}"

    agree()
