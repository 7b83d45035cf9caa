"""The wasm engine: the only part of TensorWasm that imports wasmtime.

Public surface (docs/architecture.md, the Engine contract): `Engine` compiles modules (validation,
size limit, disk cache keyed by digest and engine config), `TenantInstancePool` runs a tenant's
functions on warm, reset instances under `GuestLimits`, and `WasmState` is what snapshots carry.
Guest ABI v1 is documented in docs/guest-abi.md; its constants are in `abi`.
Must not import the HTTP layer; the accelerator is reached only through the TenantDevice protocol.
"""

from tensorwasm.runtime.engine.compiler import CompiledModule, Engine
from tensorwasm.runtime.engine.limits import GuestLimits, WasmState
from tensorwasm.runtime.engine.pool import TenantInstancePool

__all__ = ["CompiledModule", "Engine", "GuestLimits", "TenantInstancePool", "WasmState"]
