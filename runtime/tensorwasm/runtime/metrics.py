"""Every tensorwasm_* Prometheus metric of the runtime shard, defined in one place.

Names follow Prometheus conventions: tensorwasm_<noun>_<unit> with _total/_seconds/_bytes suffixes.
Must not import wasmtime, cuda or aiohttp.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

REGISTRY = CollectorRegistry(auto_describe=True)

# --- invoke path (runtime server) ---

# --- engine (compile, instances) ---

# --- GPU backend (accelerator, caps, NVML, MPS) ---

# --- snapshots ---
