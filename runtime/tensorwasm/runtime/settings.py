"""The runtime shard's one validated settings object, from flags and TENSORWASM_RUNTIME_* variables.

Owns `RuntimeSettings`, the argparse flags (shared with `tensorwasm runtime`, which registers the
same arguments on its subparser) and `load_settings`, which fails fast with a `SettingsError` that
names the flag and its environment variable. A flag beats its variable; a variable beats the default.
Stdlib only, so the CLI can import it cheaply: must not import aiohttp, wasmtime, cuda or kubernetes.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorwasm.api.fields import matches
from tensorwasm.api.logs import FORMATS
from tensorwasm.api.tenant import IDLE_AFTER_PATTERN

ENV_PREFIX = "TENSORWASM_RUNTIME_"
ACCELERATORS = ("auto", "cuda", "cpu")
LOG_LEVELS = ("debug", "info", "warning", "error")
SNAPSHOT_SIGNING_MODES = ("require", "verify-if-present", "off")  # snapshots/signing.py judges by them
AUTO_ADMIN_PORT, DEFAULT_ADMIN_PORT = -1, 9090
# --handoff-max: from the hand-off's own 45 s (HANDOFF_MIN_S) to the longest move the operator
# allows (MOVE_DEADLINE_MAX_S, 3600 s) plus a minute; the operator's SHARD_HANDOFF_MAX checks the same.
HANDOFF_MAX_RANGE = (45, 3660)
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """A setting is missing or invalid; the message says which flag and variable to fix."""


@dataclass(frozen=True)
class RuntimeSettings:
    """Everything the shard process is configured with, validated."""

    host: str = "0.0.0.0"
    port: int = 8080
    tenants_file: Path | None = None  # set: standalone mode; unset: the Kubernetes source
    kubeconfig: Path | None = None  # unset: in-cluster config, then the default kubeconfig
    namespace: str = "default"
    shard_name: str = ""
    accelerator: str = "auto"
    device: int = 0
    mps_pipe_dir: Path | None = None
    mps_start: bool = False
    cache_dir: Path | None = None
    snapshot_dir: Path | None = None
    snapshot_hot_tier_bytes: int = 1 << 30  # pinned host memory for recent snapshots; 0 turns it off
    snapshot_signing: str = "verify-if-present"  # signs with the active key if any; refuses bad signatures
    snapshot_signing_keys: Path | None = None  # a mounted Secret: <key id> files + `active`
    max_module_bytes: int = 64 << 20
    fetch_timeout_s: float = 30.0
    resync_s: float = 30.0
    # A tenant placed before its Secret/ConfigMap reached this shard (separate watches) is left
    # unreported this long: most likely still in flight (one status write instead of two).
    missing_grace_s: float = 2.0
    # A scale-in's hand-off waits for its held tenants' running work (each within its timeoutMs, at
    # most 600 s) and their captures, at most this long (sources/kube.py); the operator sets the
    # pod's grace period from the same value. 660: the largest timeoutMs plus a minute.
    handoff_max_s: float = 660.0
    health_interval_s: float = 1.0
    epoch_tick_ms: float = 1.0
    # The interpreter's GIL switch interval: how long a thread waiting for the GIL (the event loop)
    # waits before forcing a hand-over from threads that keep re-taking it (guests' host calls).
    # Python's 5 ms: 0.5 ms measured no better on bench_noisy (docs/performance.md), so no change.
    gil_switch_ms: float = 5.0
    log_level: str = "info"
    log_format: str = "text"  # text or json (tensorwasm.api.logs, the operator's format too)
    # Hardening (issue 13): /metrics and /readyz detail on their own port; None = no admin listener.
    admin_host: str = ""  # empty: the tenant listener's host
    admin_port: int | None = -1  # AUTO_ADMIN_PORT: 9090, or ephemeral when --listen's port is 0
    cache_key_file: Path | None = None  # HMAC key of the compile cache (default: <cache dir>/.cache-key)
    module_dirs: tuple[Path, ...] = ()  # module paths must lie inside these (default: file dir + cwd)
    default_gpu_memory_bytes: int = 1 << 30  # cap of a tenant that sets none
    audit_log: str = "stdout"  # issue 14: "stdout", "off" or a file path (rotated by size)
    # Idle sleep (runtime/sleep.py; needs --snapshot-dir): spec.idle.after of a tenant setting none.
    idle_after: str = "never"
    resident_gpu_bytes: int = 0  # awake tenants' caps stay within this (0: no budget)
    prewarm_tenants: int = 4  # spec.idle.prewarm: at most this many awake on a prediction, unused

    @property
    def source(self) -> str:
        return "file" if self.tenants_file is not None else "kube"


# (flag, dest, help, metavar or None for booleans)
_FLAGS: tuple[tuple[str, str, str, str | None], ...] = (
    ("--listen", "listen", "address to serve the HTTP API on, HOST:PORT (port 0 picks one)", "HOST:PORT"),
    ("--tenants-file", "tenants_file", "standalone mode: serve the tenants in this YAML file", "PATH"),
    ("--kubeconfig", "kubeconfig", "Kubernetes source: kubeconfig (default: in-cluster)", "PATH"),
    ("--namespace", "namespace", "Kubernetes source: namespace of the Tenants (default: default)", "NS"),
    ("--shard-name", "shard_name", "Kubernetes source: this shard's name (default: $HOSTNAME)", "NAME"),
    ("--accelerator", "accelerator", "GPU backend: auto, cuda or cpu (default: auto)", "MODE"),
    ("--device", "device", "CUDA device ordinal (default: 0)", "N"),
    ("--mps-pipe-dir", "mps_pipe_dir", "CUDA MPS pipe directory to join as a client", "DIR"),
    ("--mps-start", "mps_start", "start an MPS control daemon if none is running", None),
    ("--cache-dir", "cache_dir", "compiled-module disk cache (default: none)", "DIR"),
    ("--snapshot-dir", "snapshot_dir", "snapshot store directory (default: none)", "DIR"),
    ("--snapshot-hot-tier-bytes", "snapshot_hot_tier_bytes", "snapshot hot tier, bytes (1Gi; 0: off)", "N"),
    (
        "--snapshot-signing",
        "snapshot_signing",
        "require, verify-if-present or off (default: verify-if-present)",
        "MODE",
    ),
    ("--snapshot-signing-keys", "snapshot_signing_keys", "snapshot HMAC key ring directory", "DIR"),
    ("--max-module-bytes", "max_module_bytes", "largest module accepted, bytes (default: 64Mi)", "N"),
    ("--fetch-timeout", "fetch_timeout_s", "module URL fetch timeout, seconds (default: 30)", "S"),
    ("--resync", "resync_s", "a reconcile pass at least every S s; caches re-list every max(S, 300) s", "S"),
    (
        "--missing-grace",
        "missing_grace_s",
        "a tenant's missing Secret/ConfigMap reported after S s (default: 2)",
        "S",
    ),
    (
        "--handoff-max",
        "handoff_max_s",
        "a scale-in's hand-off of tenants lasts at most S s (default: 660)",
        "S",
    ),
    ("--health-interval", "health_interval_s", "accelerator health check period, s (default: 1)", "S"),
    ("--epoch-tick-ms", "epoch_tick_ms", "deadline ticker resolution, ms (default: 1)", "MS"),
    ("--gil-switch-ms", "gil_switch_ms", "GIL switch interval, ms (default: 5, Python's)", "MS"),
    ("--log-level", "log_level", "debug, info, warning or error (default: info)", "LEVEL"),
    ("--log-format", "log_format", "text or json lines (default: text)", "FORMAT"),
    (
        "--admin-listen",
        "admin_listen",
        "HOST:PORT for /metrics, /readyz detail; 'off' (default: port 9090)",
        "HOST:PORT",
    ),
    (
        "--cache-key-file",
        "cache_key_file",
        "key authenticating compile cache files (default: in the cache)",
        "PATH",
    ),
    (
        "--module-dirs",
        "module_dirs",
        "DIR:DIR module paths must lie in (default: tenants file dir, cwd)",
        "DIRS",
    ),
    ("--idle-after", "idle_after", "idle sleep of a tenant setting no idle.after: 5m, 30s, never", "DUR"),
    ("--resident-gpu-memory", "resident_gpu_bytes", "awake tenants' GPU caps within N bytes (0: none)", "N"),
    ("--prewarm-tenants", "prewarm_tenants", "at most N tenants woken ahead of predicted use (4)", "N"),
    ("--audit-log", "audit_log", "audit JSON lines: stdout (default), off, or a file PATH", "WHERE"),
    (
        "--default-gpu-memory",
        "default_gpu_memory_bytes",
        "GPU cap of a tenant setting none, bytes (1Gi)",
        "N",
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the runtime flags; defaults stay None so environment variables can fill them."""
    for flag, dest, text, metavar in _FLAGS:
        env = ENV_PREFIX + dest.upper().removesuffix("_S")
        if metavar is None:
            parser.add_argument(flag, dest=dest, action="store_const", const="1", help=f"{text} [{env}]")
        else:
            parser.add_argument(flag, dest=dest, metavar=metavar, help=f"{text} [{env}]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorwasm runtime",
        description="Run a TensorWasm runtime shard: many tenants' wasm functions behind one HTTP API.",
    )
    add_arguments(parser)
    return parser


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> RuntimeSettings:
    """Parse flags (argparse exits on unknown flags) and validate; raises SettingsError."""
    return settings_from_namespace(
        build_parser().parse_args(argv), os.environ if environ is None else environ
    )


def settings_from_namespace(ns: argparse.Namespace, environ: Mapping[str, str]) -> RuntimeSettings:
    raw: dict[str, tuple[str, str]] = {}  # dest -> (value, where it came from)
    for flag, dest, _, _ in _FLAGS:
        env = ENV_PREFIX + dest.upper().removesuffix("_S")
        value = getattr(ns, dest, None)
        if value is not None:
            raw[dest] = (str(value), flag)
        elif env in environ:
            raw[dest] = (environ[env], env)
    d = RuntimeSettings()
    out: dict[str, Any] = {}
    if "listen" in raw:
        out["host"], out["port"] = _listen(*raw["listen"])
    if "admin_listen" in raw:
        value, where = raw["admin_listen"]
        if value.strip().lower() in ("off", ""):
            out["admin_port"] = None
        else:
            out["admin_host"], out["admin_port"] = _listen(value, where)
    if "module_dirs" in raw:
        out["module_dirs"] = tuple(Path(d).expanduser() for d in raw["module_dirs"][0].split(":") if d)
    if "audit_log" in raw:
        audit = raw["audit_log"][0].strip()
        out["audit_log"] = "off" if audit.lower() in ("", "off") else audit
    if "default_gpu_memory_bytes" in raw:
        gpu = raw["default_gpu_memory_bytes"]
        out["default_gpu_memory_bytes"] = int(_number(*gpu, 1 << 20, 1 << 50, integer=True))
    for dest in ("tenants_file", "kubeconfig", "mps_pipe_dir", "cache_dir", "snapshot_dir", "cache_key_file",
                 "snapshot_signing_keys"):  # fmt: skip
        if dest in raw and raw[dest][0]:
            out[dest] = Path(raw[dest][0]).expanduser()
    for dest in ("namespace", "shard_name"):
        if dest in raw:
            out[dest] = raw[dest][0].strip()
    if "accelerator" in raw:
        out["accelerator"] = _choice(*raw["accelerator"], ACCELERATORS)
    if "snapshot_signing" in raw:
        out["snapshot_signing"] = _choice(*raw["snapshot_signing"], SNAPSHOT_SIGNING_MODES)
    if "log_level" in raw:
        out["log_level"] = _choice(*raw["log_level"], LOG_LEVELS)
    if "log_format" in raw:
        out["log_format"] = _choice(*raw["log_format"], FORMATS)
    if "mps_start" in raw:
        out["mps_start"] = _bool(*raw["mps_start"])
    if "device" in raw:
        out["device"] = int(_number(*raw["device"], 0, 64, integer=True))
    if "snapshot_hot_tier_bytes" in raw:
        hot = raw["snapshot_hot_tier_bytes"]
        out["snapshot_hot_tier_bytes"] = int(_number(*hot, 0, 1 << 40, integer=True))
    if "idle_after" in raw:
        value, where = raw["idle_after"]
        if not matches(IDLE_AFTER_PATTERN, value.strip()):
            raise SettingsError(
                f"{where}: expected a duration (500ms, 30s, 5m, 2h) or 'never', got {value!r}"
            )
        out["idle_after"] = value.strip()
    if "resident_gpu_bytes" in raw:
        out["resident_gpu_bytes"] = int(_number(*raw["resident_gpu_bytes"], 0, 1 << 50, integer=True))
    if "prewarm_tenants" in raw:
        out["prewarm_tenants"] = int(_number(*raw["prewarm_tenants"], 0, 10_000, integer=True))
    if "max_module_bytes" in raw:
        out["max_module_bytes"] = int(_number(*raw["max_module_bytes"], 1024, 1 << 32, integer=True))
    for dest, lo, hi in (
        ("fetch_timeout_s", 0.1, 3600),
        ("resync_s", 0.1, 86400),
        ("missing_grace_s", 0, 600),
        ("handoff_max_s", HANDOFF_MAX_RANGE[0], HANDOFF_MAX_RANGE[1]),
        ("health_interval_s", 0.05, 3600),
        ("epoch_tick_ms", 0.1, 1000),
        ("gil_switch_ms", 0.05, 100),
    ):
        if dest in raw:
            out[dest] = _number(*raw[dest], lo, hi)
    settings = RuntimeSettings(**{**d.__dict__, **out})
    return _check_source(settings, environ)


def _check_source(s: RuntimeSettings, environ: Mapping[str, str]) -> RuntimeSettings:
    if s.tenants_file is not None:
        if not s.tenants_file.is_file():
            raise SettingsError(f"--tenants-file: {s.tenants_file} is not a readable file")
        return s
    if not s.shard_name:
        hostname = environ.get("HOSTNAME", "")
        if not hostname:
            raise SettingsError(
                "no tenant source: pass --tenants-file PATH for standalone mode, or --shard-name NAME "
                f"({ENV_PREFIX}SHARD_NAME, default $HOSTNAME) for the Kubernetes source"
            )
        s = RuntimeSettings(**{**s.__dict__, "shard_name": hostname})
    if s.kubeconfig is not None and not s.kubeconfig.is_file():
        raise SettingsError(f"--kubeconfig: {s.kubeconfig} is not a readable file")
    if not s.namespace:
        raise SettingsError("--namespace: must not be empty")
    return s


def _listen(value: str, where: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise SettingsError(f"{where}: expected HOST:PORT (e.g. 0.0.0.0:8080), got {value!r}")
    return (host.strip("[]") or "0.0.0.0"), int(port)


def _choice(value: str, where: str, choices: tuple[str, ...]) -> str:
    if value.lower() not in choices:
        raise SettingsError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
    return value.lower()


def _bool(value: str, where: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise SettingsError(f"{where}: expected true or false, got {value!r}")


def _number(value: str, where: str, lo: float, hi: float, *, integer: bool = False) -> float:
    try:
        n = int(value) if integer else float(value)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise SettingsError(f"{where}: expected {kind}, got {value!r}") from None
    if not lo <= n <= hi:
        raise SettingsError(f"{where}: {n} is outside [{lo}, {hi}]")
    return n
