"""`tensorwasm invoke TENANT FUNCTION` (and `kubectl tensorwasm invoke`): call a tenant's function.

Owns the client: finding the tenant's token (flag, $TENSORWASM_TOKEN, else the Tenant's Secret read
through the kubeconfig), reaching its Service (its ClusterIP when reachable from here, else a
`kubectl port-forward` to it, or --url), the invoke modes of docs/openapi.yaml (sync, `--stream`:
Server-Sent Events printed as they arrive, `--async`: a job polled until it ends) and
`--repeat N --concurrency C`, a quick load test that prints a latency histogram.
Why port-forward through kubectl: the API server's pods/portforward speaks SPDY (or SPDY tunnelled
in WebSocket frames), which no library we ship implements; the service proxy cannot carry a
tenant's bearer token (the API server takes the Authorization header for itself). kubectl is there
wherever a kubectl plugin runs. Every refusal prints the runtime's error envelope (kind, message).
Imports aiohttp and the kube client lazily (`tensorwasm --help` works with the base install); must
not import the runtime or the operator.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

MAX_REPEAT = 100_000
MAX_CONCURRENCY = 256
MAX_DATA_BYTES = 256 << 20  # a body larger than any tenant's maxBodyBytes is refused before sending
MAX_EVENT_BYTES = 64 << 20  # one streamed event (a chunk, base64 when binary) held before it is printed
MAX_WAIT_S = 86_400.0
CONNECT_PROBE_S = 1.5  # how long a ClusterIP gets to accept a TCP connection before port-forwarding
PORT_FORWARD_START_S = 30.0
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
# Upper bounds of the histogram's buckets, seconds (1-2-5 steps); the last bucket is open.
BUCKETS = tuple(m * 10.0**e for e in range(-4, 2) for m in (1, 2, 5))
EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


class ClientError(Exception):
    """The invoke could not be made or was refused; the message is what the user sees."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "invoke",
        help="call a tenant's function (token from its Secret, through its Service)",
        description=(
            "Invoke FUNCTION of TENANT. The token comes from --token, $TENSORWASM_TOKEN or the Tenant's "
            "Secret (through the kubeconfig); the tenant is reached through its Service's ClusterIP when "
            "that answers from here, else through `kubectl port-forward`, or at --url."
        ),
    )
    parser.add_argument("tenant", help="the Tenant's name")
    parser.add_argument("function", help="an exported function of its module")
    parser.add_argument(
        "-n", "--namespace", default=None, help="the Tenant's namespace (default: the kubeconfig context's)"
    )
    parser.add_argument("--kubeconfig", type=Path, default=None, help="kubeconfig (default: $KUBECONFIG)")
    parser.add_argument(
        "-d", "--data", default=None, help="input bytes: a literal, @FILE, or - for stdin (default: none)"
    )
    parser.add_argument(
        "--token", default=None, help="bearer token (default: $TENSORWASM_TOKEN, else the Secret)"
    )
    parser.add_argument("--url", default=None, help="the tenant's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument(
        "--connect",
        choices=("auto", "service", "port-forward"),
        default="auto",
        help="how to reach the Service: its ClusterIP, kubectl port-forward, or auto (default)",
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--stream", action="store_true", help="print the output chunks as the guest writes them"
    )
    modes.add_argument("--async", dest="async_", action="store_true", help="run as a job and poll it")
    parser.add_argument(
        "--no-wait", action="store_true", help="with --async: print the job and return without polling"
    )
    parser.add_argument(
        "--wait", type=float, default=600.0, metavar="S", help="with --async: poll this long (default: 600)"
    )
    parser.add_argument(
        "--retry-for",
        type=float,
        default=30.0,
        metavar="S",
        help="retry refused connections and 429/503 with Retry-After this long (default: 30)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, metavar="N", help=f"invoke N times (<= {MAX_REPEAT})"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="C",
        help=f"invokes in flight with --repeat (<= {MAX_CONCURRENCY})",
    )
    parser.add_argument("--kubectl", default=None, help="kubectl for port-forwarding (default: on PATH)")
    parser.set_defaults(handler=invoke_command)


def invoke_command(args: argparse.Namespace) -> int:
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        data = read_data(args.data, sys.stdin.buffer)
        return asyncio.run(_invoke(args, data))
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


def check_args(args: argparse.Namespace) -> str | None:
    """The bounds on the flags, checked before anything is read or sent."""
    if not 1 <= args.repeat <= MAX_REPEAT:
        return f"--repeat must be between 1 and {MAX_REPEAT}, got {args.repeat}"
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        return f"--concurrency must be between 1 and {MAX_CONCURRENCY}, got {args.concurrency}"
    if args.concurrency > args.repeat:
        return f"--concurrency {args.concurrency} is more than --repeat {args.repeat}"
    if args.repeat > 1 and (args.stream or args.async_):
        return "--repeat measures plain invokes: leave out --stream and --async"
    if args.no_wait and not args.async_:
        return "--no-wait needs --async"
    if not 0 < args.wait <= MAX_WAIT_S:
        return f"--wait must be in (0, {MAX_WAIT_S:.0f}] seconds, got {args.wait}"
    if not 0 <= args.retry_for <= 3600:
        return f"--retry-for must be in [0, 3600] seconds, got {args.retry_for}"
    if args.url is not None and not re.match(r"^https?://[^/\s]+/?$", args.url):
        return f"--url must be a base URL like http://HOST:PORT, got {args.url!r}"
    return None


def read_data(spec: str | None, stdin: IO[bytes]) -> bytes:
    """`-d`: a literal, @FILE or - (stdin), at most MAX_DATA_BYTES."""
    if spec is None:
        return b""
    if spec == "-":
        data = stdin.read(MAX_DATA_BYTES + 1)
    elif spec.startswith("@"):
        try:
            with open(spec[1:], "rb") as f:
                data = f.read(MAX_DATA_BYTES + 1)
        except OSError as exc:
            raise ClientError(f"cannot read {spec[1:]}: {exc.strerror or exc}") from None
    else:
        data = spec.encode()
    if len(data) > MAX_DATA_BYTES:
        raise ClientError(f"input is over {MAX_DATA_BYTES >> 20} MiB; no tenant accepts a body that large")
    return data


# --- finding the tenant ---------------------------------------------------------------------------


@dataclass
class Target:
    """Where the tenant answers and with which token; `close` ends a port-forward."""

    url: str
    token: str
    how: str
    forward: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        if self.forward is not None and self.forward.poll() is None:
            self.forward.terminate()
            try:
                self.forward.wait(5)
            except subprocess.TimeoutExpired:
                self.forward.kill()
                self.forward.wait()


async def find_target(args: argparse.Namespace) -> Target:
    token = args.token or os.environ.get("TENSORWASM_TOKEN") or ""
    if args.url and token:
        return Target(args.url.rstrip("/"), token, "url")
    from tensorwasm.kube.config import ConfigError

    try:
        return await _from_cluster(args, token)
    except ConfigError as exc:
        raise ClientError(f"no cluster to read the tenant from ({exc}); pass --url and --token") from None


async def _from_cluster(args: argparse.Namespace, token: str) -> Target:
    import aiohttp

    from tensorwasm.api.group import API_VERSION, TENANT
    from tensorwasm.api.names import tenant_service_name
    from tensorwasm.api.tenant import parse_tenant
    from tensorwasm.kube.client import KubeError, connect, resource_path

    ns = args.namespace or default_namespace(args.kubeconfig, os.environ)
    api = await connect("tensorwasm-cli", args.kubeconfig)
    try:
        body = await api.get(resource_path(API_VERSION, TENANT.plural, ns, args.tenant))
        if body is None:
            raise ClientError(f"Tenant {ns}/{args.tenant} not found")
        tenant = parse_tenant(body)
        if tenant.status.get("phase") not in (None, "Ready", "Asleep"):  # Asleep wakes on this invoke
            reason = tenant.status.get("message") or tenant.status.get("phase")
            print(
                f"warning: Tenant {ns}/{tenant.name} is {tenant.status.get('phase')}: {reason}",
                file=sys.stderr,
            )
        if not token:
            secret = await api.get(resource_path("v1", "secrets", ns, tenant.token_secret))
            raw = ((secret or {}).get("data") or {}).get("token")
            if not raw:
                raise ClientError(f"Secret {ns}/{tenant.token_secret} has no key 'token' (pass --token)")
            token = base64.b64decode(raw).decode().strip()
        if args.url:
            return Target(args.url.rstrip("/"), token, "url")
        service_name = tenant_service_name(tenant.name)
        service = await api.get(resource_path("v1", "services", ns, service_name))
    except KubeError as exc:
        raise ClientError(f"the API server refused: {exc.status} {exc.reason}: {exc.message}") from None
    except aiohttp.ClientError as exc:
        raise ClientError(f"the API server is not reachable: {exc}") from None
    finally:
        await api.close()
    if service is None:
        raise ClientError(f"Service {ns}/{service_name} not found: is the operator running?")
    spec = service.get("spec") or {}
    ip, port = spec.get("clusterIP"), int(((spec.get("ports") or [{}])[0]).get("port") or 80)
    if args.connect != "port-forward" and ip and ip != "None" and await _reachable(ip, port):
        return Target(f"http://{ip}:{port}", token, f"Service {service_name} at {ip}:{port}")
    if args.connect == "service":
        raise ClientError(f"Service {ns}/{service_name} at {ip}:{port} is not reachable from here")
    return await _port_forward(args, ns, service_name, port, token)


def default_namespace(kubeconfig: Path | None, env: Mapping[str, str]) -> str:
    """What kubectl uses without -n: the current context's namespace, in a pod its own, else default."""
    import yaml

    paths = (
        [kubeconfig] if kubeconfig else [Path(p) for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    )
    for path in paths or [Path.home() / ".kube" / "config"]:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        current = doc.get("current-context")
        for ctx in doc.get("contexts") or []:
            if isinstance(ctx, dict) and ctx.get("name") == current:
                namespace = (ctx.get("context") or {}).get("namespace")
                if isinstance(namespace, str) and namespace:
                    return namespace
        break
    in_pod = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if not paths and "KUBERNETES_SERVICE_HOST" in env and in_pod.is_file():
        return in_pod.read_text().strip() or "default"
    return "default"


async def _reachable(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_PROBE_S)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _port_forward(args: argparse.Namespace, ns: str, service: str, port: int, token: str) -> Target:
    kubectl = args.kubectl or os.environ.get("TENSORWASM_KUBECTL") or shutil.which("kubectl")
    if not kubectl:
        raise ClientError(
            f"Service {ns}/{service} is not reachable from here and kubectl is not on PATH to port-forward "
            "(pass --kubectl, --url, or run inside the cluster)"
        )
    cmd = [kubectl, "port-forward", "-n", ns, f"service/{service}", f":{port}", "--address", "127.0.0.1"]
    if args.kubeconfig:
        cmd[1:1] = ["--kubeconfig", str(args.kubeconfig)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    target = Target("", token, f"port-forward to Service {service}", proc)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(_forwarded_port_line, proc), PORT_FORWARD_START_S)
    except TimeoutError:
        target.close()
        raise ClientError(
            f"kubectl port-forward to {ns}/{service} did not start in {PORT_FORWARD_START_S:.0f} s"
        ) from None
    found = re.search(r"127\.0\.0\.1:(\d+)", line or "")
    if not found:
        target.close()
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        raise ClientError(f"kubectl port-forward to {ns}/{service} failed: {err or line or 'no output'}")
    target.url = f"http://127.0.0.1:{found.group(1)}"
    # kubectl prints a line per connection it forwards: keep reading, or a full pipe stalls it.
    for stream in (proc.stdout, proc.stderr):
        threading.Thread(target=_drain, args=(stream,), name="port-forward-output", daemon=True).start()
    return target


def _drain(stream: IO[bytes] | None) -> None:
    if stream is not None:
        for _ in iter(lambda: stream.read(65536), b""):
            pass


def _forwarded_port_line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().decode(errors="replace")


# --- calling it -----------------------------------------------------------------------------------


async def _invoke(args: argparse.Namespace, data: bytes) -> int:
    import aiohttp

    target = await find_target(args)
    try:
        if args.repeat > 1:
            print(f"# {args.repeat} invokes, {args.concurrency} in flight, via {target.how}", file=sys.stderr)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            client = Client(session, target, args.retry_for)
            out = sys.stdout.buffer
            if args.repeat > 1:
                report = await load_test(client, args.function, data, args.repeat, args.concurrency)
                print(report.render())
                return EXIT_OK if report.all_ok else EXIT_REFUSED
            if args.stream:
                return await client.stream(args.function, data, out)
            if args.async_:
                return await client.run_job(args.function, data, out, wait_s=args.wait, no_wait=args.no_wait)
            status, body, _ = await client.invoke(args.function, data)
            if status >= 400:
                raise ClientError(describe_error(status, body))
            out.write(body)
            out.flush()
            return EXIT_OK
    finally:
        target.close()


def describe_error(status: int, body: bytes) -> str:
    """The runtime's envelope as one line: `HTTP 429 queue_full: ... (retry_after_s=1)`."""
    try:
        err = json.loads(body)["error"]
        details = ", ".join(f"{k}={v}" for k, v in err.items() if k not in ("kind", "message"))
        return f"HTTP {status} {err['kind']}: {err['message']}" + (f" ({details})" if details else "")
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"


@dataclass
class Client:
    """HTTP to one tenant: retries what the API says to retry, within `retry_for` seconds."""

    session: aiohttp.ClientSession
    target: Target
    retry_for: float

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.target.token}", "Content-Type": "application/octet-stream"}

    @contextlib.asynccontextmanager
    async def _post(self, function: str, data: bytes, mode: str) -> AsyncIterator[aiohttp.ClientResponse]:
        import aiohttp

        url = f"{self.target.url}/v1/functions/{function}/invoke" + (
            f"?mode={mode}" if mode != "sync" else ""
        )
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                resp = await self.session.post(url, data=data, headers=self._headers())
            except aiohttp.ClientConnectorError as exc:  # never connected: nothing was sent
                if time.monotonic() + 0.5 > deadline:
                    raise ClientError(f"cannot reach {self.target.how}: {exc}") from None
                await asyncio.sleep(0.5)
                continue
            except aiohttp.ClientConnectionError as exc:
                # Sent, then cut (a shard crash, a proxy): the function may have run and an async
                # invoke may have made a job, so repeating it is not ours to decide.
                raise ClientError(
                    f"the connection to {self.target.how} broke after the request was sent ({exc}); "
                    "the invoke may have run, so it was not repeated"
                ) from None
            retry = _retry_after(resp)
            if retry is None or time.monotonic() + retry > deadline:
                try:
                    yield resp
                finally:
                    resp.release()
                return
            await resp.read()
            resp.release()
            await asyncio.sleep(retry)

    async def invoke(self, function: str, data: bytes) -> tuple[int, bytes, float]:
        """(status, body, seconds) of one sync invoke, retries included."""
        start = time.perf_counter()
        async with self._post(function, data, "sync") as resp:
            body = await resp.read()
            return resp.status, body, time.perf_counter() - start

    async def stream(self, function: str, data: bytes, out: IO[bytes]) -> int:
        async with self._post(function, data, "stream") as resp:
            if resp.status >= 400 or not resp.content_type.startswith("text/event-stream"):
                body = await resp.read()
                if resp.status >= 400:
                    raise ClientError(describe_error(resp.status, body))
                out.write(body)  # a shard without streaming answered plainly
                out.flush()
                return EXIT_OK
            async for event, payload in sse_events(resp.content):
                if event == "text":
                    out.write(payload.encode())
                elif event == "bytes":
                    out.write(base64.b64decode(payload))
                elif event == "done":
                    out.flush()
                    return EXIT_OK
                elif event == "error":
                    out.flush()
                    raise ClientError("stream ended with " + describe_stream_error(payload))
                out.flush()
        raise ClientError("the stream ended without a done or error event (connection closed)")

    async def run_job(
        self, function: str, data: bytes, out: IO[bytes], *, wait_s: float, no_wait: bool
    ) -> int:
        async with self._post(function, data, "async") as resp:
            body = await resp.read()
            if resp.status != 202:
                if resp.status >= 400:
                    raise ClientError(describe_error(resp.status, body))
                raise ClientError(
                    f"expected 202 and a job, got HTTP {resp.status} (does this shard run jobs?)"
                )
            job = json.loads(body)
        if no_wait:
            print(json.dumps(job), flush=True)
            return EXIT_OK
        print(f"# job {job['id']} {job['state']}; polling {job['location']}", file=sys.stderr)
        deadline, pause = time.monotonic() + wait_s, 0.05
        while job["state"] not in TERMINAL_STATES:
            if time.monotonic() + pause > deadline:
                raise ClientError(
                    f"job {job['id']} still {job['state']} after {wait_s:g} s (it keeps running)"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
            async with self.session.get(self.target.url + job["location"], headers=self._headers()) as got:
                body = await got.read()
                retry = _retry_after(got)
                if retry is not None:  # the shard is busy or the tenant moving: poll again after that
                    pause = retry
                    continue
                if got.status >= 400:
                    raise ClientError(f"job {job['id']}: " + describe_error(got.status, body))
                job = json.loads(body)
        if job["state"] != "succeeded":
            err = job.get("error") or {}
            raise ClientError(
                f"job {job['id']} {job['state']}: {err.get('kind', '')}: {err.get('message', '')}"
            )
        out.write(base64.b64decode(job.get("output") or ""))
        out.flush()
        return EXIT_OK


def describe_stream_error(payload: str) -> str:
    """An SSE `error` event's envelope as one line (the response itself was a 200)."""
    try:
        err = json.loads(payload)["error"]
        return f"{err['kind']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return payload[:200]


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    """Seconds to wait before retrying, when the runtime says to (429/503 with Retry-After)."""
    if resp.status not in (429, 503):
        return None
    try:
        return max(0.05, float(resp.headers.get("Retry-After", "")))
    except ValueError:
        return None


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of a text/event-stream; multi-line data joined with newlines (the SSE rules).

    Lines are split here rather than by StreamReader.readline, which refuses lines over 64 KiB: a
    `bytes` event carries a whole chunk in one line. One event is bounded by MAX_EVENT_BYTES."""
    event, data, pending = "message", list[str](), bytearray()
    size = 0
    async for piece in content.iter_any():
        pending += piece
        while (nl := pending.find(b"\n")) >= 0:
            line = pending[:nl].decode().removesuffix("\r")
            del pending[: nl + 1]
            if not line:
                if data:
                    yield event, "\n".join(data)
                event, data, size = "message", [], 0
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                    size += len(value)
        if size + len(pending) > MAX_EVENT_BYTES:
            raise ClientError(f"a streamed event is over {MAX_EVENT_BYTES >> 20} MiB; stopped reading")


# --- --repeat -------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """Latencies of successful invokes and the outcome of every one."""

    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0

    @property
    def all_ok(self) -> bool:
        return set(self.outcomes) <= {"200"}

    def render(self) -> str:
        n = sum(self.outcomes.values())
        lines = [f"invokes      {n} in {self.wall_s:.2f} s ({n / self.wall_s if self.wall_s else 0:.0f}/s)"]
        lines.append("outcomes     " + ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items())))
        if self.latencies:
            q = quantiles(self.latencies)
            lines.append("latency      " + "  ".join(f"{k} {_ms(v)}" for k, v in q.items()))
            lines += ["", *histogram(self.latencies)]
        return "\n".join(lines)


async def load_test(client: Client, function: str, data: bytes, repeat: int, concurrency: int) -> LoadReport:
    """`repeat` sync invokes, `concurrency` at a time; an error counts by kind and the run goes on."""
    report = LoadReport()
    remaining = iter(range(repeat))

    async def worker() -> None:
        for _ in remaining:
            try:
                status, body, seconds = await client.invoke(function, data)
            except ClientError:
                report.outcomes["unreachable"] += 1
                continue
            if status < 400:
                report.latencies.append(seconds)
                report.outcomes[str(status)] += 1
            else:
                report.outcomes[f"{status} {_kind(body)}"] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    report.wall_s = time.perf_counter() - start
    return report


def _kind(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["kind"])
    except (ValueError, KeyError, TypeError):
        return "?"


def quantiles(latencies: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max by nearest rank."""
    ordered = sorted(latencies)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": ordered[-1]}


def histogram(latencies: Sequence[float], width: int = 40) -> list[str]:
    """One line per bucket from the first to the last non-empty one: `<= 2.0 ms  1234  #####`."""
    counts = [0] * (len(BUCKETS) + 1)
    for v in latencies:
        counts[next((i for i, b in enumerate(BUCKETS) if v <= b), len(BUCKETS))] += 1
    used = [i for i, c in enumerate(counts) if c]
    top = max(counts)
    out = []
    for i in range(used[0], used[-1] + 1):
        label = f"<= {_ms(BUCKETS[i])}" if i < len(BUCKETS) else f" > {_ms(BUCKETS[-1])}"
        bar = "#" * max(1 if counts[i] else 0, round(width * counts[i] / top))
        out.append(f"{label:>12} {counts[i]:>7}  {bar}")
    return out


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms" if ms < 1000 else f"{seconds:.2f} s"
