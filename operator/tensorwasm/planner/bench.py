"""Evidence from the project's own benchmark results (bench/results/*.json, shape in bench/README.md).

Owns reading those files and looking figures up by base name, whatever unit suffix the benchmark
chose (``invoke_p95_us`` and ``invoke_p95_ms`` both answer ``invoke_p95`` in seconds). A value
found here makes the planner tag a figure *measured*. Must not import matplotlib or the CLI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorwasm.planner.errors import PlanInputError

# suffix -> (quantity kind, scale to SI: seconds, bytes, bytes/s, plain)
_SUFFIXES: dict[str, tuple[str, float]] = {
    "ns": ("seconds", 1e-9), "us": ("seconds", 1e-6), "ms": ("seconds", 1e-3), "s": ("seconds", 1.0),
    "bytes": ("bytes", 1.0), "kib": ("bytes", 1024.0), "mib": ("bytes", 1 << 20), "gib": ("bytes", 1 << 30),
    "gbps": ("bytes_per_s", 1e9), "tbps": ("bytes_per_s", 1e12),
}  # fmt: skip

# Planner input -> accepted figure base names, first match wins. Benchmarks that want to back a
# planner figure should use one of these names (see docs/capacity-planning.md).
FIGURE_NAMES: dict[str, tuple[str, ...]] = {
    "cpu_per_request": ("invoke_cpu", "cpu_per_request", "invoke_cpu_per_request", "invoke_server_cpu"),
    "invoke_p95": ("invoke_p95", "http_invoke_p95"),
    "invoke_p99": ("invoke_p99", "http_invoke_p99"),
    "gpu_invoke_p95": ("gpu_invoke_p95", "invoke_gpu_p95"),
    "gpu_time_per_request": ("gpu_time_per_request", "launch_sync_p50", "launch_plus_sync_p50"),
    "context_overhead": ("cuda_context", "context_overhead"),
    "mps_client_overhead": ("mps_client_overhead", "mps_context"),
    "memory_bandwidth": ("memory_bandwidth", "membw", "hbm_bandwidth"),
    "tenants": ("tenants", "concurrent_tenants"),
    "qps": ("qps", "offered_qps", "load_rps"),
    # Idle sleep (bench_sleep.py): the fewest tenants at which the shard was seen swapping, and how
    # many fit awake in that run's budget (the all-resident case).
    "swap_onset": ("density_onset_measured_tenants",),
    "resident_tenants": ("density_resident_tenants",),
    "active_fraction": ("density_active_fraction",),
}


@dataclass(frozen=True)
class Measurement:
    value: float  # SI units: seconds, bytes, bytes/s, or a plain number
    origin: str  # "bench/results/runtime.json:invoke_p95_us"


@dataclass(frozen=True)
class Evidence:
    """Every figure of every results file, by file name and then by figure name."""

    documents: dict[str, dict[str, Any]]

    def lookup(self, planner_input: str) -> Measurement | None:
        for base in FIGURE_NAMES[planner_input]:
            for file_name, doc in sorted(self.documents.items()):
                found = _find(doc.get("figures", {}), base)
                if found is not None:
                    name, value = found
                    return Measurement(value, f"{file_name}:{name}")
        return None

    def in_same_file(self, origin: str, planner_input: str) -> float | None:
        """A companion figure (e.g. how many tenants a latency run used) from the file behind `origin`."""
        file_name = origin.split(":", 1)[0]
        figures = self.documents.get(file_name, {}).get("figures", {})
        for base in FIGURE_NAMES[planner_input]:
            found = _find(figures, base)
            if found is not None:
                return found[1]
        return None


def _find(figures: object, base: str) -> tuple[str, float] | None:
    if not isinstance(figures, dict):
        return None
    for name, value in figures.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if name.lower() == base.lower():
            return name, float(value)
        prefix, _, suffix = name.rpartition("_")
        if prefix.lower() == base.lower() and suffix.lower() in _SUFFIXES:
            return name, float(value) * _SUFFIXES[suffix.lower()][1]
    return None


def read_bench_results(directory: Path) -> Evidence:
    """Load every *.json under `directory`; a file that is not the documented shape is an error."""
    if not directory.is_dir():
        raise PlanInputError("--bench-results", f"{directory} is not a directory")
    documents: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PlanInputError("--bench-results", f"{path}: not readable JSON ({exc})") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("figures", {}), dict):
            raise PlanInputError("--bench-results", f"{path}: expected an object with a 'figures' mapping")
        documents[f"{directory.name}/{path.name}"] = doc
    return Evidence(documents)


NO_EVIDENCE = Evidence({})
