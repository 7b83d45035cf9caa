"""The runtime shard's Kubernetes source against a real API server (no operator: the test places Tenants).

A real `tensorwasm runtime --shard-name shard-0` process watches the namespace. The test plays the
operator's part by writing status.shard through the status subresource, and checks what a user
would notice: the shard serves exactly the Tenants placed on it, reports status.runtime (only when
it changes), follows Secret rotation, refuses a bad module for that tenant alone, lets go of a
Tenant moved elsewhere, and converges again after a restart (level-triggered re-list).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
ECHO = (REPO / "tests" / "fixtures" / "echo.wat").read_bytes()
ECHO_SHA = hashlib.sha256(ECHO).hexdigest()


class Shard:
    """One runtime shard process (the pod stand-in)."""

    def __init__(
        self, kube: Any, namespace: str, name: str, log_path: Path, extra: tuple[str, ...] = ()
    ) -> None:
        self.kube, self.namespace, self.name, self.log_path = kube, namespace, name, log_path
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.port = self.admin_port = 0  # admin: /readyz detail and /metrics

    def start(self) -> Shard:
        cmd = [sys.executable, "-m", "tensorwasm.runtime", "--kubeconfig", str(self.kube.kubeconfig),
               "--namespace", self.namespace, "--shard-name", self.name, "--listen", "127.0.0.1:0",
               "--accelerator", "cpu", "--resync", "5", *self.extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 60
        with self.log_path.open("a") as log:
            while time.monotonic() < deadline:
                line = self.proc.stderr.readline()
                log.write(line)
                m = re.search(r"Runtime listening addr=127\.0\.0\.1:(\d+) admin=127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port, self.admin_port = int(m.group(1)), int(m.group(2))
                    break
                if not line and self.proc.poll() is not None:
                    raise AssertionError(f"shard exited early: see {self.log_path}")
        assert self.port, "shard did not start"
        threading.Thread(target=self._drain, daemon=True).start()  # the pipe must never fill
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with self.log_path.open("a") as log:
            for line in self.proc.stderr:
                log.write(line)
                log.flush()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def log_count(self, pattern: str) -> int:
        """Lines of this shard's log matching `pattern` (run with --log-level debug for the pass lines)."""
        return len(re.findall(pattern, self.log_path.read_text()))

    def invoke(self, token: str, function: str, body: bytes) -> tuple[int, bytes]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/functions/{function}/invoke", data=body,
            headers={"Authorization": f"Bearer {token}"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


@pytest.fixture
def shard(kube: Any, namespace: str, tmp_path: Path) -> Iterator[Callable[..., Shard]]:
    started: list[Shard] = []

    def make(*extra: str, name: str = "shard-0") -> Shard:
        s = Shard(kube, namespace, name, tmp_path / f"{name}.log", extra).start()
        started.append(s)
        return s

    yield make
    for s in started:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def apply(kube: Any, namespace: str, obj: dict[str, Any]) -> None:
    kube.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(obj))


def place(kube: Any, namespace: str, tenant: str, shard_name: str) -> None:
    patch = json.dumps({"status": {"shard": shard_name}})
    kube.kubectl(
        "patch", "tenant", tenant, "-n", namespace, "--subresource=status", "--type=merge", "-p", patch
    )


def tenant_obj(name: str, sha: str) -> dict[str, Any]:
    return {
        "apiVersion": "tensorwasm.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {
            "module": {"configMapRef": {"name": "echo-module", "key": "module.wasm"}, "sha256": sha},
            "functions": ["echo"],
            "limits": {"linearMemory": "16Mi", "timeoutMs": 500, "maxConcurrency": 2},
            "authSecretRef": {"name": f"{name}-token"},
        },
    }


def secret(name: str, token: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {"token": base64.b64encode(token.encode()).decode()}}  # fmt: skip


def tenant_status(kube: Any, namespace: str, tenant: str) -> dict[str, Any]:
    obj = json.loads(kube.kubectl("get", "tenant", tenant, "-n", namespace, "-o", "json"))
    return dict(obj.get("status") or {})


def runtime_status(kube: Any, namespace: str, tenant: str) -> dict[str, Any]:
    return dict(tenant_status(kube, namespace, tenant).get("runtime") or {})


def place_alpha_on_shard_0(kube: Any, namespace: str) -> None:
    """The echo module, alpha's token Secret and alpha itself, placed on shard-0."""
    apply(kube, namespace, module_configmap())
    apply(kube, namespace, secret("alpha-token", "alpha-token-0001"))
    apply(kube, namespace, tenant_obj("alpha", ECHO_SHA))
    place(kube, namespace, "alpha", "shard-0")


def module_configmap() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "echo-module"},
            "binaryData": {"module.wasm": base64.b64encode(ECHO).decode()}}  # fmt: skip


def test_shard_serves_reports_and_converges(kube: Any, namespace: str, shard: Callable[..., Shard]) -> None:
    apply(kube, namespace, module_configmap())
    apply(kube, namespace, secret("alpha-token", "alpha-token-0001"))
    apply(kube, namespace, secret("beta-token", "beta-token-00001"))
    apply(kube, namespace, tenant_obj("alpha", ECHO_SHA))
    apply(kube, namespace, tenant_obj("beta", "0" * 64))  # wrong digest: refused, alone
    apply(kube, namespace, tenant_obj("gamma", ECHO_SHA))  # never placed here: not served
    place(kube, namespace, "alpha", "shard-0")
    place(kube, namespace, "beta", "shard-0")
    place(kube, namespace, "gamma", "shard-7")

    s = shard("--log-level", "debug")
    report = wait_for(lambda: runtime_status(kube, namespace, "alpha").get("loaded"), 30, "alpha loaded")
    assert report is True
    alpha = runtime_status(kube, namespace, "alpha")
    assert (
        alpha["shard"] == "shard-0" and alpha["reason"] == "ModuleLoaded" and alpha["observedGeneration"] == 1
    )
    beta = wait_for(lambda: runtime_status(kube, namespace, "beta") or None, 30, "beta report")
    assert beta["loaded"] is False and beta["reason"] == "DigestMismatch"
    assert runtime_status(kube, namespace, "gamma") == {}
    # Like a kubelet, the shard writes the readiness its report implies (no operator runs here).
    assert tenant_status(kube, namespace, "alpha")["phase"] == "Ready"
    assert tenant_status(kube, namespace, "beta")["phase"] == "Degraded"
    conditions = {c["type"]: c for c in tenant_status(kube, namespace, "alpha")["conditions"]}
    assert conditions["Ready"]["status"] == "True" and conditions["ModuleReady"]["reason"] == "ModuleLoaded"
    assert s.invoke("alpha-token-0001", "echo", b"hi") == (200, b"hi")
    assert s.invoke("beta-token-00001", "echo", b"hi")[0] == 503
    # Both reports went out in one pass over one kept-alive connection, without a retry.
    assert "Failed reconciling" not in s.log_path.read_text()
    # The CRD makes status.shard selectable: this shard watches only its own Tenants (gamma is not).
    assert "Watching every Tenant" not in s.log_path.read_text()

    # Quiet when nothing changes: a resync does not rewrite status.
    reported_at = alpha["reportedAt"]
    passes = s.log_count("Passed over Tenants")
    wait_for(lambda: s.log_count("Passed over Tenants") >= passes + 2, 30, "two more passes (one a resync)")
    assert runtime_status(kube, namespace, "alpha")["reportedAt"] == reported_at

    # Secret rotation reaches the shard; the old token stops working.
    apply(kube, namespace, secret("alpha-token", "alpha-token-0002"))
    wait_for(lambda: s.invoke("alpha-token-0002", "echo", b"x")[0] == 200, 30, "rotated token")
    assert s.invoke("alpha-token-0001", "echo", b"x")[0] == 401

    # Moved to another shard: this one lets go, and for a while (kube-proxy and kept-alive
    # connections lag) tells a caller it moved (503 tenant_moving: retry) rather than 401.
    place(kube, namespace, "alpha", "shard-1")

    def released() -> bool:
        status, body = s.invoke("alpha-token-0002", "echo", b"x")
        return status == 503 and json.loads(body)["error"]["kind"] == "tenant_moving"

    wait_for(released, 30, "alpha released")
    assert (
        "alpha"
        not in json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{s.admin_port}/readyz", timeout=5).read()
        )["loaded"]
    )

    # Restart: a fresh process re-lists and converges (alpha back on shard-0).
    assert s.stop() == 0
    place(kube, namespace, "alpha", "shard-0")
    s2 = shard()
    wait_for(lambda: s2.invoke("alpha-token-0002", "echo", b"again")[0] == 200, 30, "served after restart")
    ready = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{s2.admin_port}/readyz", timeout=5).read())
    assert ready["loaded"] == ["alpha"] and ready["failed"] == {"beta": "DigestMismatch"}


def test_a_secret_arriving_just_after_placement_costs_one_report(
    kube: Any, namespace: str, shard: Callable[..., Shard]
) -> None:
    apply(kube, namespace, module_configmap())
    # A grace of 30 s, not the default 2: placing two tenants and applying a Secret with kubectl
    # takes seconds on a busy machine, and the test is about what happens inside the grace.
    s = shard("--log-level", "debug", "--missing-grace", "30")
    apply(kube, namespace, tenant_obj("late", ECHO_SHA))
    apply(kube, namespace, tenant_obj("never", ECHO_SHA))
    place(kube, namespace, "late", "shard-0")
    place(kube, namespace, "never", "shard-0")
    # The Secret comes after the placement, as a watch may deliver it: once the shard has passed over
    # the tenant without its Secret (a report deferred by the grace), it arrives.
    wait_for(lambda: s.log_count("Passed over Tenants ours=2 reports=0 deferred=True"), 30, "a deferred pass")
    apply(kube, namespace, secret("late-token", "late-token-00001"))
    wait_for(lambda: runtime_status(kube, namespace, "late").get("loaded"), 30, "late loaded")
    # A Secret that stays missing is reported once the grace has passed.
    never = wait_for(lambda: runtime_status(kube, namespace, "never") or None, 90, "never reported")
    assert never["loaded"] is False and never["reason"] == "SecretMissing"
    assert tenant_status(kube, namespace, "never")["phase"] == "Degraded"
    assert s.invoke("late-token-00001", "echo", b"hi") == (200, b"hi")
    log = s.log_path.read_text()
    assert log.count("Reported Tenant status name=late ") == 1, log

    # Deleting a Tenant (held here by someone's finalizer) stops it being served at once, with no
    # further report (its deletion bumps the generation: no reload for that).
    hold = json.dumps({"metadata": {"finalizers": ["example.com/hold"]}})
    kube.kubectl("patch", "tenant", "late", "-n", namespace, "--type=merge", "-p", hold)
    kube.kubectl("delete", "tenant", "late", "-n", namespace, "--wait=false")
    wait_for(lambda: s.invoke("late-token-00001", "echo", b"x")[0] == 401, 30, "late unserved")
    assert s.log_path.read_text().count("Reported Tenant status name=late ") == 1
    kube.kubectl(
        "patch", "tenant", "late", "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}'
    )


def test_snapshots_of_served_tenants_are_captured_and_restored_on_start(
    kube: Any, namespace: str, shard: Callable[..., Shard], tmp_path: Path
) -> None:
    place_alpha_on_shard_0(kube, namespace)
    store = tmp_path / "snapshots"
    # A resync far beyond the waits below: the Snapshot watch alone must drive capture and deletion.
    s = shard("--snapshot-dir", str(store), "--resync", "60")
    wait_for(lambda: runtime_status(kube, namespace, "alpha").get("loaded"), 30, "alpha loaded")
    assert "restored" not in runtime_status(kube, namespace, "alpha")["message"]  # nothing to restore yet

    apply(kube, namespace, {"apiVersion": "tensorwasm.io/v1alpha1", "kind": "Snapshot",
                            "metadata": {"name": "alpha-1"}, "spec": {"tenant": "alpha"}})  # fmt: skip

    def snapshot_status() -> dict[str, Any]:
        obj = json.loads(kube.kubectl("get", "snapshot", "alpha-1", "-n", namespace, "-o", "json"))
        return dict(obj.get("status") or {})

    ready = wait_for(
        lambda: snapshot_status() if snapshot_status().get("phase") == "Ready" else None,
        10,
        "capture driven by the Snapshot watch",
    )
    assert ready["shard"] == "shard-0"
    assert any(store.rglob("*")), "no blob in the shard's snapshot store"

    # A fresh process restores the newest Ready snapshot before alpha serves.
    assert s.stop() == 0
    s2 = shard("--snapshot-dir", str(store), "--resync", "60")
    restored = "restored from Snapshot alpha-1"
    wait_for(
        lambda: restored in runtime_status(kube, namespace, "alpha").get("message", ""),
        30,
        "restore on start",
    )
    assert s2.invoke("alpha-token-0001", "echo", b"after restore") == (200, b"after restore")

    # Deleting the Snapshot removes its blob, then the finalizer lets it go.
    kube.kubectl("delete", "snapshot", "alpha-1", "-n", namespace, "--wait=false")
    wait_for(lambda: snapshot_gone(kube, namespace, "alpha-1"), 10, "snapshot deleted")
    assert not [p for p in store.rglob("*") if p.is_file()], "the blob outlived its Snapshot"


def snapshot_gone(kube: Any, namespace: str, name: str) -> bool:
    proc = kube.run_kubectl("get", "snapshot", name, "-n", namespace, "-o", "name")
    return proc.returncode != 0 and "NotFound" in proc.stderr


def test_snapshot_of_a_removed_shard_is_deleted_by_a_live_one(
    kube: Any, namespace: str, shard: Callable[..., Shard], tmp_path: Path
) -> None:
    place_alpha_on_shard_0(kube, namespace)
    store = tmp_path / "snapshots"  # shared, as one ReadWriteMany volume
    s0 = shard("--snapshot-dir", str(store), name="shard-0")
    s1 = shard("--snapshot-dir", str(store), "--resync", "1", "--log-level", "debug", name="shard-1")
    wait_for(lambda: runtime_status(kube, namespace, "alpha").get("loaded"), 30, "alpha loaded")
    apply(kube, namespace, {"apiVersion": "tensorwasm.io/v1alpha1", "kind": "Snapshot",
                            "metadata": {"name": "alpha-1"}, "spec": {"tenant": "alpha"}})  # fmt: skip

    def phase() -> str:
        obj = json.loads(kube.kubectl("get", "snapshot", "alpha-1", "-n", namespace, "-o", "json"))
        return str((obj.get("status") or {}).get("phase", ""))

    wait_for(lambda: phase() == "Ready", 30, "capture on shard-0")
    assert s0.stop() == 0
    # shard-0's pod still exists (being replaced, say): it stays the Snapshot's deleter.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "shard-0"},
           "spec": {"containers": [{"name": "runtime", "image": "tensorwasm/runtime:test"}]}}  # fmt: skip
    apply(kube, namespace, pod)
    kube.kubectl("delete", "tenant", "alpha", "-n", namespace)
    kube.kubectl("delete", "snapshot", "alpha-1", "-n", namespace, "--wait=false")
    # shard-1 lists the pods (shard-0's is live), and the pass that listed them finishes, deleting nothing.
    wait_for(lambda: s1.log_count("Listed shard pods live=shard-0,shard-1"), 30, "shard-0's pod seen")
    passes = s1.log_count("Passed over Tenants")
    wait_for(lambda: s1.log_count("Passed over Tenants") > passes, 30, "the pass that listed them done")
    assert not snapshot_gone(kube, namespace, "alpha-1"), "shard-1 acted while shard-0's pod exists"
    assert [p for p in store.rglob("*") if p.is_file()]

    # The pod goes: shard-1, the lowest live shard, removes the blob and lets the Snapshot go.
    kube.kubectl("delete", "pod", "shard-0", "-n", namespace, "--grace-period=0", "--force")
    wait_for(lambda: snapshot_gone(kube, namespace, "alpha-1"), 20, "snapshot deleted by shard-1")
    assert not [p for p in store.rglob("*") if p.is_file()], "the blob outlived its Snapshot"


def test_kubectl_shows_a_sleeping_tenant_and_a_request_wakes_it(
    kube: Any, namespace: str, shard: Callable[..., Shard], tmp_path: Path
) -> None:
    # Idle sleep against the real API server (issue 18): the shard's report makes kubectl's PHASE
    # column say Asleep while Ready stays True (a request wakes it), and the wake is reported back.
    apply(kube, namespace, module_configmap())
    apply(kube, namespace, secret("sleepy-token", "sleepy-token-001"))
    sleepy = tenant_obj("sleepy", ECHO_SHA)
    # The API server refuses a spec.idle.after under its 10s floor (the CRD's CEL rule) ...
    sleepy["spec"]["idle"] = {"after": "500ms"}
    refused = kube.run_kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(sleepy))
    assert refused.returncode != 0 and "at least 10s" in refused.stderr, refused.stderr
    # ... while the shard's default (the operator's --idle-after) may be shorter.
    del sleepy["spec"]["idle"]
    apply(kube, namespace, sleepy)
    place(kube, namespace, "sleepy", "shard-0")
    s = shard("--snapshot-dir", str(tmp_path / "snapshots"), "--idle-after", "2s")

    def phase() -> str:
        phase_only = ("-o", "custom-columns=PHASE:.status.phase", "--no-headers")
        return kube.kubectl("get", "tenants", "sleepy", "-n", namespace, *phase_only).strip()

    wait_for(lambda: phase() == "Asleep", 60, "kubectl get tenants to show sleepy Asleep")
    ready = {c["type"]: c for c in tenant_status(kube, namespace, "sleepy")["conditions"]}["Ready"]
    assert ready["status"] == "True" and ready["reason"] == "Asleep"
    listed = kube.kubectl("get", "tenants", "-n", namespace)
    assert any(line.split()[:2] == ["sleepy", "Asleep"] for line in listed.splitlines()), listed
    assert s.invoke("sleepy-token-001", "echo", b"wake up") == (200, b"wake up")
    wait_for(lambda: phase() == "Ready", 60, "the woken tenant reported Ready")


def test_a_bad_extra_token_key_is_ignored_and_named_while_the_tenant_keeps_serving(
    kube: Any, namespace: str, shard: Callable[..., Shard]
) -> None:
    # Review R2 G7: a weak read key added to a serving tenant's Secret refused the whole tenant (and
    # dropped its sleeping state). Now that key alone is ignored, named in the tenant's status.
    place_alpha_on_shard_0(kube, namespace)
    s = shard()
    wait_for(lambda: s.invoke("alpha-token-0001", "echo", b"x")[0] == 200, 30, "alpha served")
    refusals: list[int] = []
    stop = threading.Event()

    def keep_calling() -> None:  # the good key must answer throughout the Secret's edits
        while not stop.is_set():
            status, _ = s.invoke("alpha-token-0001", "echo", b"x")
            if status != 200:
                refusals.append(status)
            stop.wait(0.05)  # pacing only: the assertion is on every answer, not on timing

    caller = threading.Thread(target=keep_calling, daemon=True)
    caller.start()
    try:
        weak = secret("alpha-token", "alpha-token-0001")
        weak["data"]["read-token.ci"] = base64.b64encode(b"abc").decode()
        apply(kube, namespace, weak)
        message = wait_for(
            lambda: (
                (m := runtime_status(kube, namespace, "alpha").get("message", ""))
                and "read-token.ci" in m
                and m
            ),
            30,
            "the ignored key named in status.runtime",
        )
        assert (
            f"ignored Secret {namespace}/alpha-token key 'read-token.ci': a token needs at least 8" in message
        )
        assert "abc" not in message.replace(namespace, "")  # the key is named, never its value
        status = tenant_status(kube, namespace, "alpha")
        ready = {c["type"]: c for c in status["conditions"]}
        assert status["phase"] == "Ready" and "read-token.ci" in ready["ModuleReady"]["message"]
        assert s.invoke("abc", "echo", b"x")[0] == 401  # the ignored key authenticates nothing
        fixed = secret("alpha-token", "alpha-token-0001")
        fixed["data"]["read-token.ci"] = base64.b64encode(b"reader-ci-0001").decode()
        apply(kube, namespace, fixed)
        # A read token is known (403: it may not invoke), where the ignored one was unknown (401).
        wait_for(lambda: s.invoke("reader-ci-0001", "echo", b"x")[0] == 403, 30, "the fixed read key")
        wait_for(lambda: "ignored" not in runtime_status(kube, namespace, "alpha").get("message", "x"), 30,
                 "the note gone from status")  # fmt: skip
    finally:
        stop.set()
        caller.join(30)
    assert refusals == [], refusals


IDLE_AFTER_RULES = (
    "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/idle/properties/after/"
    "x-kubernetes-validations"
)


def test_a_tenant_stored_before_the_idle_after_floor_keeps_serving(
    kube: Any, namespace: str, shard: Callable[..., Shard], tmp_path: Path
) -> None:
    # Review R2 G9: Tenants created with idle.after under 10s before the floor existed stopped serving
    # after the upgrade. Stored as an older CRD allowed (the rule taken out for the create), the tenant
    # serves, sleeping after 10s, and its status says so; the API server still refuses a changed value.
    crd = json.loads(kube.kubectl("get", "crd", "tenants.tensorwasm.io", "-o", "json"))
    idle = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["idle"]
    rules = idle["properties"]["after"]["x-kubernetes-validations"]
    apply(kube, namespace, module_configmap())
    apply(kube, namespace, secret("old-token", "old-token-00001"))
    old = tenant_obj("old", ECHO_SHA)
    old["spec"]["idle"] = {"after": "500ms"}
    remove = json.dumps([{"op": "remove", "path": IDLE_AFTER_RULES}])
    kube.kubectl("patch", "crd", "tenants.tensorwasm.io", "--type=json", "-p", remove)
    try:
        wait_for(
            lambda: (
                kube.run_kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(old)).returncode
                == 0
            ),
            60,
            "the API server to take the CRD without the floor",
        )
    finally:
        restore = json.dumps([{"op": "add", "path": IDLE_AFTER_RULES, "value": rules}])
        kube.kubectl("patch", "crd", "tenants.tensorwasm.io", "--type=json", "-p", restore)
    probe = tenant_obj("probe", ECHO_SHA)
    probe["spec"]["idle"] = {"after": "400ms"}
    wait_for(
        lambda: kube.run_kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                 input_text=json.dumps(probe)).returncode != 0,
        60,
        "the API server to enforce the floor again",
    )  # fmt: skip
    place(kube, namespace, "old", "shard-0")
    s = shard("--snapshot-dir", str(tmp_path / "snapshots"))
    report = wait_for(lambda: runtime_status(kube, namespace, "old").get("loaded") and runtime_status(
        kube, namespace, "old"), 60, "old loaded")  # fmt: skip
    assert report["reason"] in ("ModuleLoaded", "Asleep")
    assert "spec.idle.after '500ms' is under the 10s floor" in report["message"]
    assert s.invoke("old-token-00001", "echo", b"still here") == (200, b"still here")
    assert tenant_status(kube, namespace, "old")["phase"] in ("Ready", "Asleep")
    # The rule ratchets: another spec change goes through with the stored value unchanged ...
    bump = json.dumps({"spec": {"limits": {"timeoutMs": 600}}})
    kube.kubectl("patch", "tenant", "old", "-n", namespace, "--type=merge", "-p", bump)
    # ... while a new value under the floor is refused.
    lower = json.dumps({"spec": {"idle": {"after": "400ms"}}})
    refused = kube.run_kubectl("patch", "tenant", "old", "-n", namespace, "--type=merge", "-p", lower)
    assert refused.returncode != 0 and "at least 10s" in refused.stderr, refused.stderr
    wait_for(
        lambda: runtime_status(kube, namespace, "old").get("observedGeneration") == 2, 60, "generation 2"
    )
    assert s.invoke("old-token-00001", "echo", b"x") == (200, b"x")
