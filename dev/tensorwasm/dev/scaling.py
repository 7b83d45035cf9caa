"""Scale the shard StatefulSet out and in under counting clients, and measure it (test, bench, demo).

Owns `CountingClient` (one per counter tenant, counter.wasm: adds 1 and checks that every total is
the previous one plus one, so a lost or repeated write shows; honours Retry-After on 429/503 and
counts every answer) and `ScalingRun` (clients for a release's tenants; scale to N and wait until
the new shard is Ready and serving the tenants that moved to it; scale back and wait until they are
home; the times of each). Bounded: clients only call addresses of the local cluster (a ClusterIP or
127.0.0.1), stop after `max_requests` or `max_seconds`, whichever comes first. Must not be imported
by the product (tensorwasm.dev: editable installs only).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tensorwasm.api.names import tenant_service_name

MAX_RETRY_AFTER_S = 2.0  # the client's own cap on one Retry-After wait
ALLOWED = ("tenant_moving", "tenant_not_ready", "queue_full")  # the 429/503 kinds a client retries
POD_NAME = "statefulset.kubernetes.io/pod-name"

Kubectl = Callable[..., str]


def local_address(url: str) -> tuple[str, int]:
    """(host, port) of `url`, refused unless the host is loopback or a private (cluster) address."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    address = ipaddress.ip_address(host)  # a name is refused too: no lookups to anywhere
    if not (address.is_loopback or address.is_private):
        raise ValueError(f"load goes to the local cluster only, not {host}")
    return host, parts.port or 80


@dataclass
class CountingClient:
    """Adds 1 to one counter tenant until stopped or bounded; every answer counted."""

    tenant: str
    url: str
    token: str
    max_requests: int = 100_000
    max_seconds: float = 600.0
    outcomes: Counter[str] = field(default_factory=Counter)
    total: int = -1  # -1: not read yet (the first answer sets it)
    errors: list[str] = field(default_factory=list)
    ok_times: list[float] = field(default_factory=list)  # monotonic time of each 200
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.host, self.port = local_address(self.url)
        self.thread = threading.Thread(target=self.run, name=f"load-{self.tenant}", daemon=True)

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        sent = 0
        while not self.stop.is_set() and sent < self.max_requests and time.monotonic() < deadline:
            sent += 1
            try:
                status, retry_after, body = self.call()
            except OSError as exc:  # refused, reset, timed out: a failed request for a real client
                self.outcomes[f"connection:{type(exc).__name__}"] += 1
                self.errors.append(f"{self.tenant}: {exc!r}")
                self.stop.wait(0.2)
                continue
            if status == 200:
                (value,) = struct.unpack("<q", body)
                if self.total >= 0 and value != self.total + 1:
                    self.errors.append(f"{self.tenant}: total {value} after {self.total}")
                self.total = value
                self.outcomes["200"] += 1
                self.ok_times.append(time.monotonic())
                continue
            kind = _error_kind(body)
            self.outcomes[f"{status}:{kind}"] += 1
            if status in (429, 503) and retry_after is not None and kind in ALLOWED:
                self.stop.wait(min(float(retry_after), MAX_RETRY_AFTER_S))
            else:
                self.errors.append(f"{self.tenant}: {status} {body[:200]!r}")
                self.stop.wait(0.2)

    def call(self) -> tuple[int, str | None, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            headers = {"Authorization": f"Bearer {self.token}"}
            conn.request("POST", "/v1/functions/add/invoke", b"", headers)
            resp = conn.getresponse()
            return resp.status, resp.getheader("Retry-After"), resp.read()
        finally:
            conn.close()

    def served_since(self, moment: float) -> bool:
        return bool(self.ok_times) and self.ok_times[-1] > moment


def _error_kind(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["kind"])
    except (ValueError, KeyError, TypeError):
        return "unparsed"


@dataclass
class ScaleResult:
    """One scale step: seconds from `kubectl scale` to each milestone; the tenants that moved."""

    replicas: tuple[int, int]
    moved: dict[str, tuple[str, str]]  # tenant -> (from shard, to shard)
    pods_ready_s: float | None  # scale-out: the new shard pods Ready; scale-in: the removed ones terminating
    settled_s: float  # every moved tenant placed, loaded and its Service re-pointed (no status.move)
    serving_s: float  # ... and each moved tenant's client got a 200 after that


@dataclass
class ScalingRun:
    """Counting clients on a namespace's counter tenants, and measured scale steps."""

    kubectl: Kubectl
    namespace: str
    statefulset: str = "tensorwasm-shard"
    clients: dict[str, CountingClient] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-n", self.namespace, "-o", "json"))

    def start(self, access: dict[str, tuple[str, str]], **bounds: Any) -> None:
        """One client per tenant: `access` maps tenant -> (ClusterIP URL, token)."""
        for tenant, (url, token) in access.items():
            self.clients[tenant] = CountingClient(tenant, url, token, **bounds)
        for client in self.clients.values():
            client.thread.start()

    def stop(self) -> Counter[str]:
        for client in self.clients.values():
            client.stop.set()
        for client in self.clients.values():
            client.thread.join(40)
        totals: Counter[str] = Counter()
        for client in self.clients.values():
            totals.update(client.outcomes)
        return totals

    def errors(self) -> list[str]:
        return [e for c in self.clients.values() for e in c.errors]

    def placements(self) -> dict[str, dict[str, Any]]:
        return {t["metadata"]["name"]: t.get("status") or {} for t in self.get("tenants")["items"]}

    def selectors(self) -> dict[str, str]:
        out = {}
        for svc in self.get("services")["items"]:
            pod = (svc["spec"].get("selector") or {}).get(POD_NAME)
            if pod:
                out[svc["metadata"]["name"]] = pod
        return out

    def shard_pods(self) -> dict[str, bool]:
        """Shard pod -> Ready."""
        out = {}
        for pod in self.get("pods")["items"]:
            name = pod["metadata"]["name"]
            if name.startswith(f"{self.statefulset}-") and not pod["metadata"].get("deletionTimestamp"):
                conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions") or []}
                out[name] = conditions.get("Ready") == "True"
        return out

    def scale(self, replicas: int, timeout_s: float = 300) -> ScaleResult:
        """`kubectl scale` (what an autoscaler writes to /scale), then `settle`."""
        before = {n: s.get("shard") for n, s in self.placements().items()}
        old = len(self.shard_pods())
        start = time.monotonic()
        self.kubectl("scale", "statefulset", self.statefulset, f"--replicas={replicas}", "-n", self.namespace)
        self.log(f"scaled {self.statefulset} {old} -> {replicas}")
        return self.settle(replicas, start, before, old, timeout_s)

    def replicas(self) -> int:
        return int(self.get("statefulset", self.statefulset)["spec"]["replicas"])

    def settle(
        self, replicas: int, start: float, before: dict[str, Any], old: int, timeout_s: float = 300
    ) -> ScaleResult:
        """Wait until `replicas` shard pods are Ready and every tenant is placed on one of them, loaded,
        its Service re-pointed and (for those that moved since `before`) answering its client; the
        seconds since `start` of each milestone."""
        wanted = {f"{self.statefulset}-{i}" for i in range(replicas)}
        pods_ready: float | None = None
        while True:
            now = time.monotonic()
            if now - start > timeout_s:
                raise TimeoutError(
                    f"scaling to {replicas} did not settle in {timeout_s:.0f}s: {self.placements()}"
                )
            pods = self.shard_pods()
            if pods_ready is None and set(pods) == wanted and all(pods.values()):
                pods_ready = now - start
                self.log(f"shard pods {sorted(pods)} Ready after {pods_ready:.1f}s")
            status = self.placements()
            selectors = self.selectors()
            home = all(
                s.get("shard") in wanted
                and not s.get("move")
                and not s.get("pendingMove")  # placed elsewhere, waiting for that pod to be Ready
                and (s.get("runtime") or {}).get("shard") == s.get("shard")
                and (s.get("runtime") or {}).get("loaded")
                and selectors.get(tenant_service_name(n)) == s.get("shard")
                for n, s in status.items()
            )
            if home and pods_ready is not None:
                break
            time.sleep(0.25)
        settled = time.monotonic()
        moved = {
            n: (str(before.get(n)), str(s["shard"]))
            for n, s in status.items()
            if s.get("shard") != before.get(n)
        }
        self.log(f"tenants settled after {settled - start:.1f}s; moved {len(moved)}: {moved}")
        movers = [self.clients[n] for n in moved if n in self.clients]
        while not all(c.served_since(settled) for c in movers):
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"moved tenants not served after {timeout_s:.0f}s: {sorted(moved)}")
            time.sleep(0.05)
        firsts = [min(t for t in c.ok_times if t > settled) for c in movers]
        serving = max(firsts or [settled]) - start
        return ScaleResult((old, replicas), moved, pods_ready, settled - start, serving)
