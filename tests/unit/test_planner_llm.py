"""LLM KV-cache budget: bytes per token, pool, blocks, concurrency, decode roofline, presets."""

from __future__ import annotations

import pytest

from tensorwasm.planner.errors import PlanInputError
from tensorwasm.planner.llm import LlmInputs, ModelShape, budget, kv_bytes_per_token, preset

SEED_70B = ModelShape("Llama-2-70B", 70e9, 80, 64, 8, 128, 4096)


def inputs(shape: ModelShape = SEED_70B, **kw: object) -> LlmInputs:
    base: dict[str, object] = {
        "shape": shape,
        "weight_dtype": "int8",
        "kv_dtype": "fp16",
        "gpu_name": "H100",
        "gpu_memory_bytes": 80_000_000_000,
        "bandwidth_bytes_per_s": 3.35e12,
        "overhead_bytes": 2_000_000_000,
        "activation_bytes": 2_000_000_000,
        "block_size": 16,
        "contexts": (512, 1024, 2048, 4096, 8192),
        "batches": (1, 8),
    }
    base.update(kw)
    return LlmInputs(**base)  # type: ignore[arg-type]


def test_kv_bytes_per_token_70b() -> None:
    # 2 * 80 layers * 8 kv heads * 128 dims * 2 bytes = 327,680 B
    assert kv_bytes_per_token(SEED_70B, 2) == 327_680


def test_pool_blocks_and_concurrency_by_hand() -> None:
    b = budget(inputs())
    # 80 GB - 70 GB (int8 weights) - 2 GB - 2 GB = 6 GB
    assert b.kv_pool_bytes == 6_000_000_000
    assert b.kv_tokens == 6_000_000_000 // 327_680 == 18_310
    # one block = 16 * 327,680 = 5,242,880 B -> floor(6e9 / 5,242,880) = 1144
    assert b.blocks == 1144
    assert [(r.context, r.max_requests) for r in b.contexts] == [
        (512, 35),  # 1144 // 32
        (1024, 17),
        (2048, 8),
        (4096, 4),
        (8192, 2),
    ]


def test_decode_roofline() -> None:
    b = budget(inputs(contexts=(1,), batches=(1,)))
    # weights 70 GB / 3.35 TB/s = 20.9 ms -> ~47.9 tokens/s at batch 1 (plus one token of KV)
    assert b.decode[0].step_s == pytest.approx(70e9 / 3.35e12, rel=1e-4)
    assert b.decode[0].tokens_per_s == pytest.approx(47.86, rel=1e-3)


def test_batched_decode_reads_kv_and_can_overflow_pool() -> None:
    b = budget(inputs(contexts=(8192,), batches=(8,)))
    row = b.decode[0]
    assert row.step_s == pytest.approx((70e9 + 8 * 8192 * 327_680) / 3.35e12)
    assert row.fits_kv is False  # 8 requests x 512 blocks > 1144 blocks


def test_presets_have_published_shapes() -> None:
    llama3_8b = preset("llama-3-8b")
    assert (llama3_8b.layers, llama3_8b.kv_heads, llama3_8b.head_dim) == (32, 8, 128)
    assert kv_bytes_per_token(llama3_8b, 2) == 131_072  # 128 KiB per token
    assert kv_bytes_per_token(preset("Llama-3-70B"), 2) == 327_680
    assert kv_bytes_per_token(preset("Mistral-7B"), 2) == 131_072
    qwen = preset("Qwen2-7B")
    assert (qwen.layers, qwen.attention_heads, qwen.kv_heads) == (28, 28, 4)
    assert kv_bytes_per_token(qwen, 2) == 57_344
    assert kv_bytes_per_token(preset("Llama-2-7B"), 2) == 524_288  # no GQA: 512 KiB per token


def test_tensor_parallel_splits_weights_and_kv() -> None:
    b = budget(inputs(shape=preset("Llama-3-70B"), weight_dtype="bf16", tensor_parallel=2))
    assert b.kv_bytes_per_token == 163_840
    assert b.weight_bytes == pytest.approx(70.55e9)


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(PlanInputError, match=r"--gpu-memory.*holds no KV cache"):
        budget(inputs(weight_dtype="fp16"))  # 140 GB of weights on an 80 GB GPU
    with pytest.raises(PlanInputError, match="--model"):
        preset("gpt-9")
    with pytest.raises(PlanInputError, match="--kv-dtype"):
        budget(inputs(kv_dtype="fp7"))
    with pytest.raises(PlanInputError, match="--kv-heads"):
        budget(inputs(shape=ModelShape("x", 7e9, 32, 32, 5, 128, 4096)))
    with pytest.raises(PlanInputError, match="--tp"):
        budget(inputs(tensor_parallel=3))
