"""Per-tenant guest limits and the wasm state a snapshot carries.

Pure data; must not import wasmtime.
"""

from __future__ import annotations

from dataclasses import dataclass

from tensorwasm.api.tenant import WASM32_MAX_MEMORY as MAX_MEMORY_BYTES
from tensorwasm.api.tenant import WASM_PAGE as WASM_PAGE  # instance.py and pool.py take it from here
from tensorwasm.runtime.errors import BadRequest

# Defaults of the limits below; docs/runtime.md ("Limits") lists each with the error a caller sees.
DEFAULT_TABLE_ELEMENTS = 100_000  # per table: ~1.6 MiB of funcref slots at most
DEFAULT_TABLES = 8
DEFAULT_MAX_OUTPUT_BYTES = 16 << 20
DEFAULT_HOST_CALLS_PER_INVOKE = 100_000
DEFAULT_HOST_CALLS_PER_S = 20_000  # each call holds the GIL a few us: 20k/s is ~5% of it
DEFAULT_LOG_BYTES_PER_INVOKE = 16 << 10
DEFAULT_LOG_BYTES_PER_S = 64 << 10


@dataclass(frozen=True)
class GuestLimits:
    """What one tenant's guest may use: linear memory, tables, time per invoke, warm instances,
    output size, host calls (per invoke and per second) and guest log bytes."""

    memory_bytes: int = 64 << 20
    timeout_s: float = 1.0
    max_instances: int = 4
    table_elements: int = DEFAULT_TABLE_ELEMENTS
    tables: int = DEFAULT_TABLES
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    host_calls_per_invoke: int = DEFAULT_HOST_CALLS_PER_INVOKE
    host_calls_per_s: int = DEFAULT_HOST_CALLS_PER_S
    log_bytes_per_invoke: int = DEFAULT_LOG_BYTES_PER_INVOKE
    log_bytes_per_s: int = DEFAULT_LOG_BYTES_PER_S

    def __post_init__(self) -> None:
        for name, lo, hi in (
            ("table_elements", 0, 10_000_000),
            ("tables", 1, 1024),
            ("max_output_bytes", 0, MAX_MEMORY_BYTES),
            ("host_calls_per_invoke", 1, 1 << 40),
            ("host_calls_per_s", 1, 1 << 40),
            ("log_bytes_per_invoke", 0, 1 << 30),
            ("log_bytes_per_s", 0, 1 << 30),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise BadRequest(f"{name} must be an integer in [{lo}, {hi}], got {value!r}", field=name)
        if not isinstance(self.memory_bytes, int) or not WASM_PAGE <= self.memory_bytes <= MAX_MEMORY_BYTES:
            raise BadRequest(
                f"linear memory limit must be between 64 KiB and 4 GiB, got {self.memory_bytes!r}",
                field="memory_bytes",
            )
        if not isinstance(self.timeout_s, int | float) or not 0 < self.timeout_s <= 3600:
            raise BadRequest(
                f"invoke timeout must be in (0, 3600] seconds, got {self.timeout_s!r}", field="timeout_s"
            )
        if not isinstance(self.max_instances, int) or not 1 <= self.max_instances <= 1024:
            raise BadRequest(
                f"max instances must be between 1 and 1024, got {self.max_instances!r}",
                field="max_instances",
            )


@dataclass
class WasmState:
    """Linear memory and mutable exported globals of a tenant's instances at a barrier.

    `globals` holds (export name, valtype, value); hidden mutable globals appear under the
    `__tw_global_<index>` exports the engine adds at compile time.
    """

    memory: bytes | memoryview
    globals: list[tuple[str, str, int | float]]
