"""Per-tenant guest limits and the wasm state a snapshot carries.

Pure data; must not import wasmtime.
"""

from __future__ import annotations

from dataclasses import dataclass

from tensorwasm.runtime.errors import BadRequest

WASM_PAGE = 64 << 10
MAX_MEMORY_BYTES = 4 << 30  # memory32


@dataclass(frozen=True)
class GuestLimits:
    """What one tenant's guest may use: linear memory, time per invoke, warm instances."""

    memory_bytes: int = 64 << 20
    timeout_s: float = 1.0
    max_instances: int = 4

    def __post_init__(self) -> None:
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
