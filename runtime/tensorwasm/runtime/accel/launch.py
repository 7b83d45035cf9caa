"""Launch checks both backends run before any kernel starts, and tenant PTX signature parsing.

Owns `LaunchLimits`, `validate_launch` (kernel known, grid/block within the device's limits, dynamic
shared memory within the function's limit, argument count, kinds and ranges, buffer handles owned by the
tenant and large enough for a built-in's extents) and `signature_from_ptx`. Everything is refused here,
with `InvalidKernelLaunch`, before the driver sees it. Pure: must not import cuda, numpy or wasmtime.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tensorwasm.runtime.accel.base import KernelArg
from tensorwasm.runtime.accel.kernels import KernelSignature
from tensorwasm.runtime.errors import InvalidKernelLaunch, ModuleRejected


@dataclass(frozen=True)
class LaunchLimits:
    """Device and function limits a launch must respect (defaults: an H100 with 48 KiB default smem)."""

    max_grid: tuple[int, int, int] = (2**31 - 1, 65535, 65535)
    max_block: tuple[int, int, int] = (1024, 1024, 64)
    max_threads_per_block: int = 1024
    max_dynamic_shared: int = 48 * 1024


# Which KernelArg kinds each parameter class accepts. Built-in pointers take handles only.
_ACCEPTS: dict[str, frozenset[str]] = {
    "ptr": frozenset({"buffer"}),
    "b64": frozenset({"buffer", "u64", "i64"}),
    "b32": frozenset({"u32", "i32"}),
    "u32": frozenset({"u32"}),
    "i32": frozenset({"i32"}),
    "u64": frozenset({"u64"}),
    "i64": frozenset({"i64"}),
    "f32": frozenset({"f32"}),
    "f64": frozenset({"f64"}),
}
_RANGES: dict[str, tuple[int, int]] = {
    "u32": (0, 2**32 - 1),
    "i32": (-(2**31), 2**31 - 1),
    "u64": (0, 2**64 - 1),
    "i64": (-(2**63), 2**63 - 1),
}
_F32_MAX = 3.4028234663852886e38


def _dims(what: str, dims: Any, maxima: tuple[int, int, int], kernel: str) -> int:
    try:
        x, y, z = dims
    except (TypeError, ValueError):
        raise InvalidKernelLaunch(
            f"{what} must be three integers (x, y, z), got {dims!r}", kernel=kernel
        ) from None
    if (
        x.__class__ is int and y.__class__ is int and z.__class__ is int
        and 0 < x <= maxima[0] and 0 < y <= maxima[1] and 0 < z <= maxima[2]
    ):  # fmt: skip
        return int(x * y * z)
    for axis, value, top in zip("xyz", (x, y, z), maxima, strict=True):
        if type(value) is not int or not 1 <= value <= top:
            raise InvalidKernelLaunch(
                f"{what}.{axis} must be an integer in 1..{top}, got {value!r}", kernel=kernel
            )
    raise AssertionError("unreachable")


def _bad_arg(name: str, i: int, param: str, arg: Any, buffers: Mapping[int, Any]) -> InvalidKernelLaunch:
    """The precise reason argument `i` was refused (slow path, only on refusal)."""
    kind, value = getattr(arg, "kind", None), getattr(arg, "value", None)
    if not isinstance(arg, KernelArg):
        return InvalidKernelLaunch(f"argument {i} of {name} is not a KernelArg: {arg!r}", kernel=name)
    if kind not in _ACCEPTS[param]:
        return InvalidKernelLaunch(
            f"argument {i} of {name} must be one of {sorted(_ACCEPTS[param])}, got {kind!r}", kernel=name
        )
    if kind == "buffer":
        return InvalidKernelLaunch(f"argument {i} of {name}: unknown buffer handle {value!r}", kernel=name)
    if kind in _RANGES:
        low, high = _RANGES[kind]
        return InvalidKernelLaunch(
            f"argument {i} of {name} must be a {kind} integer in {low}..{high}, got {value!r}", kernel=name
        )
    return InvalidKernelLaunch(f"argument {i} of {name} must be a finite {kind}, got {value!r}", kernel=name)


def validate_launch(
    sig: KernelSignature,
    grid: Any,
    block: Any,
    args: Sequence[KernelArg],
    shared_mem_bytes: Any,
    limits: LaunchLimits,
    buffers: Mapping[int, tuple[Any, ...]],
) -> list[int | float]:
    """Check one launch; returns the argument values (buffers still as handles) in parameter order.

    `buffers` maps the tenant's handles to (backend object, size, ...).
    """
    name = sig.name
    _dims("grid", grid, limits.max_grid, name)
    threads = _dims("block", block, limits.max_block, name)
    if threads > limits.max_threads_per_block:
        raise InvalidKernelLaunch(
            f"block has {threads} threads; {name} allows at most {limits.max_threads_per_block}", kernel=name
        )
    if shared_mem_bytes.__class__ is not int or not 0 <= shared_mem_bytes <= limits.max_dynamic_shared:
        raise InvalidKernelLaunch(
            f"dynamic shared memory must be 0..{limits.max_dynamic_shared} bytes, got {shared_mem_bytes!r}",
            kernel=name,
        )
    params = sig.params
    if len(args) != len(params):
        raise InvalidKernelLaunch(
            f"{name} takes {len(params)} arguments, got {len(args)}", kernel=name, expected=list(params)
        )
    values: list[int | float] = []
    for i, param in enumerate(params):
        arg = args[i]
        kind = getattr(arg, "kind", None)
        value = getattr(arg, "value", None)
        if kind not in _ACCEPTS[param]:
            raise _bad_arg(name, i, param, arg, buffers)
        if kind == "buffer":
            if value.__class__ is not int or value not in buffers:
                raise _bad_arg(name, i, param, arg, buffers)
        elif kind in _RANGES:
            low, high = _RANGES[kind]
            if value.__class__ is not int or not low <= value <= high:  # type: ignore[operator]
                raise _bad_arg(name, i, param, arg, buffers)
        else:
            if value.__class__ not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
                raise _bad_arg(name, i, param, arg, buffers)
            if kind == "f32" and abs(value) > _F32_MAX:  # type: ignore[arg-type]
                raise InvalidKernelLaunch(f"argument {i} of {name} overflows f32: {value!r}", kernel=name)
            value = float(value)  # type: ignore[arg-type]
        values.append(value)  # type: ignore[arg-type]
    if sig.extents is not None:
        for index, need in sig.extents(values):
            size = buffers[int(values[index])][1]
            if need > size:
                raise InvalidKernelLaunch(
                    f"argument {index} of {name} needs {need} bytes but its buffer holds {size}",
                    kernel=name,
                    needed=need,
                    size=size,
                )
    return values


_MAX_PTX_BYTES = 8 << 20
_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$%][\w$]*)\s*\(([^)]*)\)", re.S)
_PARAM_TYPE = re.compile(r"^\s*\.param\s+\.(\w+)\b(.*)$", re.S)
_PTX_CLASSES = {
    "u64": "b64", "b64": "b64", "s64": "b64",
    "u32": "b32", "b32": "b32", "s32": "b32",
    "f32": "f32", "f64": "f64",
}  # fmt: skip


def signature_from_ptx(kernel: str, ptx: str) -> KernelSignature:
    """Parameter classes of entry `kernel` in `ptx`; raises ModuleRejected when it cannot be used."""
    if not isinstance(ptx, str) or not ptx.strip():
        raise ModuleRejected(f"PTX for kernel {kernel!r} is empty", kernel=kernel)
    if len(ptx.encode()) > _MAX_PTX_BYTES:
        raise ModuleRejected(f"PTX for kernel {kernel!r} is over {_MAX_PTX_BYTES} bytes", kernel=kernel)
    entries = {m.group(1): m.group(2) for m in _ENTRY.finditer(ptx)}
    if kernel not in entries:
        raise ModuleRejected(
            f"PTX has no .entry named {kernel!r} (found {sorted(entries)})",
            kernel=kernel,
            found=sorted(entries),
        )
    params: list[str] = []
    body = entries[kernel].strip()
    for i, text in enumerate(body.split(",") if body else []):
        match = _PARAM_TYPE.match(text)
        if match is None or "[" in match.group(2) or match.group(1) not in _PTX_CLASSES:
            raise ModuleRejected(
                f"parameter {i} of {kernel!r} has an unsupported type: {text.strip()!r} "
                "(scalars .u32/.s32/.b32/.u64/.s64/.b64/.f32/.f64 only)",
                kernel=kernel,
            )
        params.append(_PTX_CLASSES[match.group(1)])
    return KernelSignature(kernel, tuple(params))
