"""A sleep snapshot whose Tenant was deleted while its shard was down is swept against the real API
server: the shard lists every Tenant uid of its namespace, removes the orphan's record and blob, and
keeps the sleeper whose Tenant still exists (it wakes in its own state).

A real `tensorwasm runtime --shard-name shard-0` process, as in test_runtime_kube_source.py (whose
helpers this reuses); the test plays the operator's part by writing status.shard.
"""

# ruff: noqa: F811  (pytest fixtures are imported by name and taken as parameters)
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.cluster.test_runtime_kube_source import (
    ECHO_SHA,
    Shard,
    apply,
    module_configmap,
    place,
    secret,
    shard,  # noqa: F401  (fixture)
    tenant_obj,
)
from tests.conftest import wait_for


def phase(kube: Any, namespace: str, name: str) -> str:
    only = ("-o", "custom-columns=PHASE:.status.phase", "--no-headers")
    return str(kube.kubectl("get", "tenants", name, "-n", namespace, *only)).strip()


def uid(kube: Any, namespace: str, name: str) -> str:
    return str(
        json.loads(kube.kubectl("get", "tenant", name, "-n", namespace, "-o", "json"))["metadata"]["uid"]
    )


def test_a_tenant_deleted_while_its_shard_was_down_has_its_sleep_snapshot_swept(
    kube: Any, namespace: str, shard: Callable[..., Shard], tmp_path: Path
) -> None:
    apply(kube, namespace, module_configmap())
    for name in ("gone", "kept"):
        apply(kube, namespace, secret(f"{name}-token", f"{name}-token-0001"))
        obj = tenant_obj(name, ECHO_SHA)
        if name == "kept":  # both sleep after the shards' --idle-after (spec.idle.after is >= 10s)
            obj["spec"]["idle"] = {"prewarm": "history"}
        apply(kube, namespace, obj)
        place(kube, namespace, name, "shard-0")
    # The API server keeps spec.idle.prewarm (the CRD has it) and refuses a mode it does not know.
    stored = kube.kubectl("get", "tenant", "kept", "-n", namespace, "-o", "jsonpath={.spec.idle.prewarm}")
    assert stored.strip() == "history"
    bad = tenant_obj("bad", ECHO_SHA)
    bad["spec"]["idle"] = {"prewarm": "always"}
    refused = kube.run_kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(bad))
    assert refused.returncode != 0 and "prewarm" in refused.stderr, refused.stderr
    store = tmp_path / "snapshots"
    first = shard("--snapshot-dir", str(store), "--idle-after", "2s")
    for name in ("gone", "kept"):
        wait_for(lambda name=name: phase(kube, namespace, name) == "Asleep", 60, f"{name} asleep")
    gone, kept = uid(kube, namespace, "gone"), uid(kube, namespace, "kept")
    assert first.stop() == 0  # its sleepers sleep on: records and blobs stay
    kube.kubectl("delete", "tenant", "gone", "-n", namespace)
    files = [store / "sleeping" / f"{u}.sleep.json" for u in (gone, kept)]
    assert all(f.is_file() for f in files)
    hour_ago = time.time() - 3600  # past the sweep's grace time (a fresh snapshot is never swept)
    for path in [*files, *(store / "tenants").rglob("*")]:
        os.utime(path, (hour_ago, hour_ago))

    second = shard("--snapshot-dir", str(store), "--idle-after", "2s")
    swept = f"Removed the sleep snapshot of a Tenant that no longer exists key={gone}.sleep"
    wait_for(lambda: second.log_count(swept) == 1, 60, "the orphan swept")
    assert not files[0].exists() and not (store / "tenants" / f"{gone}.sleep").exists()
    assert files[1].is_file() and any((store / "tenants" / f"{kept}.sleep").glob("*.twsnap"))
    assert second.invoke("kept-token-0001", "echo", b"still here") == (200, b"still here")
