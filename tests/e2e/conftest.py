"""Shared pieces of the end-to-end tests: the local stack fixture and small kubectl helpers."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from tensorwasm.dev.stack import LocalStack
from tests.conftest import Kube

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def get(kube: Kube, namespace: str, *args: str) -> Any:
    return json.loads(kube.kubectl("get", *args, "-n", namespace, "-o", "json"))


@pytest.fixture
def stack(kube: Kube, namespace: str, tmp_path: Path) -> Iterator[LocalStack]:
    running = LocalStack(kube.kubeconfig, namespace, tmp_path / "stack", shards=2).start()
    yield running
    kube.kubectl("delete", "tenants,snapshots", "--all", "-n", namespace, "--timeout=60s", check=False)
    running.stop()


def apply_module(kube: Kube, namespace: str, name: str) -> str:
    wasm = bytes(wasmtime.wat2wasm((FIXTURES / f"{name}.wat").read_text()))
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-module"},
        "binaryData": {"module.wasm": base64.b64encode(wasm).decode()},
    }
    kube.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(cm))
    return hashlib.sha256(wasm).hexdigest()
