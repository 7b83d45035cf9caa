"""LLM tenants: KV-cache budget, paged blocks, concurrency per context length, decode roofline.

Owns model shapes (presets for public models and custom ones) and the arithmetic:
  kv_bytes_per_token = 2 (K and V) * layers * kv_heads * head_dim * kv_dtype_bytes / tp
  kv_pool            = gpu_memory - weights / tp - runtime_overhead - activations
  blocks             = floor(kv_pool / (block_size * kv_bytes_per_token))
  max_requests(ctx)  = floor(blocks / ceil(ctx / block_size))
  decode tokens/s    = batch * bandwidth / (weights / tp + batch * ctx * kv_bytes_per_token)
Pure; must not import matplotlib or the CLI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tensorwasm.planner.errors import PlanInputError
from tensorwasm.planner.units import format_bytes

DTYPE_BYTES: dict[str, float] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: float  # parameter count
    layers: int
    attention_heads: int
    kv_heads: int  # < attention_heads with grouped-query attention
    head_dim: int
    max_context: int

    def validate(self) -> ModelShape:
        for field, value, low, high in (
            ("--params", self.params, 1e6, 1e13),
            ("--layers", self.layers, 1, 1000),
            ("--attention-heads", self.attention_heads, 1, 1024),
            ("--kv-heads", self.kv_heads, 1, 1024),
            ("--head-dim", self.head_dim, 1, 4096),
            ("--max-context", self.max_context, 1, 10_000_000),
        ):
            if not low <= value <= high:
                raise PlanInputError(field, f"must be between {low:g} and {high:g}, got {value:g}")
        if self.attention_heads % self.kv_heads:
            raise PlanInputError(
                "--kv-heads", f"{self.kv_heads} does not divide {self.attention_heads} heads"
            )
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.params,
            "layers": self.layers,
            "attentionHeads": self.attention_heads,
            "kvHeads": self.kv_heads,
            "headDim": self.head_dim,
            "maxContext": self.max_context,
        }


# Shapes from the models' published configs (config.json): parameter counts are exact totals.
PRESETS: dict[str, ModelShape] = {
    s.name.lower(): s
    for s in (
        ModelShape("Llama-2-7B", 6.738e9, 32, 32, 32, 128, 4096),
        ModelShape("Llama-2-70B", 68.98e9, 80, 64, 8, 128, 4096),
        ModelShape("Llama-3-8B", 8.030e9, 32, 32, 8, 128, 8192),
        ModelShape("Llama-3-70B", 70.55e9, 80, 64, 8, 128, 8192),
        ModelShape("Mistral-7B", 7.242e9, 32, 32, 8, 128, 32768),
        ModelShape("Qwen2-7B", 7.616e9, 28, 28, 4, 128, 32768),
    )
}


def preset(name: str) -> ModelShape:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        known = ", ".join(s.name for s in PRESETS.values())
        raise PlanInputError("--model", f"unknown model {name!r}; presets: {known}") from None


def dtype_bytes(field: str, name: str) -> float:
    try:
        return DTYPE_BYTES[name.lower()]
    except KeyError:
        raise PlanInputError(field, f"unknown dtype {name!r}; one of {', '.join(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class LlmInputs:
    shape: ModelShape
    weight_dtype: str
    kv_dtype: str
    gpu_name: str
    gpu_memory_bytes: int
    bandwidth_bytes_per_s: float
    overhead_bytes: int  # CUDA context + serving framework buffers
    activation_bytes: int
    block_size: int
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    tensor_parallel: int = 1


@dataclass(frozen=True)
class ContextRow:
    context: int
    blocks_per_request: int
    max_requests: int


@dataclass(frozen=True)
class DecodeRow:
    batch: int
    context: int
    step_s: float
    tokens_per_s: float
    per_request_tokens_per_s: float
    fits_kv: bool


@dataclass(frozen=True)
class LlmBudget:
    inputs: LlmInputs
    kv_bytes_per_token: float
    weight_bytes: float
    kv_pool_bytes: float
    kv_tokens: int
    blocks: int
    contexts: tuple[ContextRow, ...]
    decode: tuple[DecodeRow, ...]
    formulas: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        i = self.inputs
        return {
            "model": i.shape.to_json(),
            "weightDtype": i.weight_dtype,
            "kvDtype": i.kv_dtype,
            "tensorParallel": i.tensor_parallel,
            "gpu": {
                "name": i.gpu_name,
                "memoryBytes": i.gpu_memory_bytes,
                "bandwidthBytesPerSecond": i.bandwidth_bytes_per_s,
            },
            "overheadBytes": i.overhead_bytes,
            "activationBytes": i.activation_bytes,
            "kvBytesPerToken": self.kv_bytes_per_token,
            "weightBytesPerGpu": self.weight_bytes,
            "kvPoolBytes": self.kv_pool_bytes,
            "kvTokens": self.kv_tokens,
            "blockSize": i.block_size,
            "blocks": self.blocks,
            "maxConcurrentRequests": [
                {
                    "context": r.context,
                    "blocksPerRequest": r.blocks_per_request,
                    "maxRequests": r.max_requests,
                }
                for r in self.contexts
            ],
            "decodeRoofline": [
                {
                    "batch": r.batch,
                    "context": r.context,
                    "stepSeconds": r.step_s,
                    "tokensPerSecond": r.tokens_per_s,
                    "perRequestTokensPerSecond": r.per_request_tokens_per_s,
                    "fitsKvPool": r.fits_kv,
                }
                for r in self.decode
            ],
            "formulas": list(self.formulas),
            "source": "modeled",
        }


def kv_bytes_per_token(shape: ModelShape, kv_dtype_bytes: float, tensor_parallel: int = 1) -> float:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * kv_dtype_bytes / tensor_parallel


def budget(i: LlmInputs) -> LlmBudget:
    shape = i.shape.validate()
    if i.tensor_parallel < 1 or shape.kv_heads % i.tensor_parallel:
        raise PlanInputError(
            "--tp", f"must be >= 1 and divide {shape.kv_heads} KV heads, got {i.tensor_parallel}"
        )
    if not 1 <= i.block_size <= 4096:
        raise PlanInputError("--block-size", f"must be between 1 and 4096 tokens, got {i.block_size}")
    kv_b = dtype_bytes("--kv-dtype", i.kv_dtype)
    w_b = dtype_bytes("--weight-dtype", i.weight_dtype)
    per_token = kv_bytes_per_token(shape, kv_b, i.tensor_parallel)
    weights = shape.params * w_b / i.tensor_parallel
    pool = i.gpu_memory_bytes - weights - i.overhead_bytes - i.activation_bytes
    if pool <= 0:
        raise PlanInputError(
            "--gpu-memory",
            f"{format_bytes(i.gpu_memory_bytes)} holds no KV cache: weights {format_bytes(weights)}"
            f" + overhead {format_bytes(i.overhead_bytes)}"
            f" + activations {format_bytes(i.activation_bytes)} already exceed it",
        )
    block_bytes = i.block_size * per_token
    blocks = int(pool // block_bytes)
    rows = []
    for ctx in i.contexts:
        per_request = math.ceil(ctx / i.block_size)
        rows.append(ContextRow(ctx, per_request, blocks // per_request))
    decode = []
    for batch in i.batches:
        for ctx in i.contexts[:1] or (0,):
            step = (weights + batch * ctx * per_token) / i.bandwidth_bytes_per_s
            need_blocks = batch * math.ceil(ctx / i.block_size)
            decode.append(DecodeRow(batch, ctx, step, batch / step, 1 / step, need_blocks <= blocks))
    tp = f" / {i.tensor_parallel}" if i.tensor_parallel > 1 else ""
    formulas = (
        f"kv_bytes_per_token = 2 * {shape.layers} layers * {shape.kv_heads} kv_heads"
        f" * {shape.head_dim} head_dim"
        f" * {kv_b:g} B ({i.kv_dtype}){tp} = {per_token:,.0f} B",
        f"weights = {shape.params:.4g} params * {w_b:g} B ({i.weight_dtype}){tp} = {format_bytes(weights)}",
        f"kv_pool = {format_bytes(i.gpu_memory_bytes)} - {format_bytes(weights)} weights - "
        f"{format_bytes(i.overhead_bytes)} overhead - {format_bytes(i.activation_bytes)} activations"
        f" = {format_bytes(pool)}",
        f"blocks = floor({format_bytes(pool)} / ({i.block_size} tokens * {per_token:,.0f} B)) = {blocks}",
        "max_requests(ctx) = floor(blocks / ceil(ctx / block_size))",
        f"decode tokens/s = batch * {i.bandwidth_bytes_per_s / 1e9:g} GB/s"
        " / (weights + batch * ctx * kv_bytes_per_token)",
    )
    return LlmBudget(
        i, per_token, weights, pool, int(pool // per_token), blocks, tuple(rows), tuple(decode), formulas
    )
