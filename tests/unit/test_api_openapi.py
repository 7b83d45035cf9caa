"""docs/openapi.yaml says exactly what the aiohttp app serves: paths, methods and status codes."""

from __future__ import annotations

from pathlib import Path

import yaml

from tensorwasm.runtime import errors
from tensorwasm.runtime.api.app import INVOKE_STATUSES, ROUTES, build_app
from tests.runtime_fixtures import runtime_server  # noqa: F401  (fixture)

SPEC = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml").read_text())


def test_paths_methods_and_status_codes_match_the_routes(runtime_server) -> None:  # noqa: F811
    documented = {
        (method.upper(), path, tuple(sorted(int(code) for code in op["responses"])))
        for path, item in SPEC["paths"].items()
        for method, op in item.items()
    }
    declared = {(method, path, tuple(sorted(codes))) for method, path, _, codes in ROUTES}
    assert documented == declared
    # ...and the routes table is what the live router serves.
    app = build_app(runtime_server([]).shard)
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert served == {(method, path) for method, path, _, _ in ROUTES}


def test_every_invoke_error_code_is_a_fault_status() -> None:
    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    statuses = {c.status for c in subclasses(errors.RuntimeFault)}
    assert set(INVOKE_STATUSES) - {200} <= statuses
    assert SPEC["openapi"].startswith("3.1")
