"""Quantized KV-cache formats and their memory cost.

One module per format, each with a PyTorch quantize/dequantize pair that is the reference:
`int8` (symmetric, per token per KV head), `fp8` (e4m3fn, per-tensor or per-KV-head scales),
`int4` (KIVI-style: asymmetric, keys per channel, values per token, residual window; the same
module quantizes `int2`, KIVI's 2-bit setting).
`kvlab.cache.quantized.QuantizedPagedKVCache` stores them in paged blocks (one codec per format,
kvlab/cache/block_codecs.py); `sim.FakeQuantKVCache` is the contiguous
twin used to measure accuracy. Layouts: docs/architecture.md section 4.

`bytes_per_token` is the number every capacity claim rests on, so it counts everything stored per
token: codes, scales and zero points, for keys and values of every layer.
"""
from __future__ import annotations

import torch

from kvlab.quant import int4
from kvlab.quant.common import DEFAULT_BLOCK_SIZE, KV_CACHE_DTYPES, check_kv_cache_dtype

__all__ = ["DEFAULT_BLOCK_SIZE", "KV_CACHE_DTYPES", "check_kv_cache_dtype", "bytes_per_block", "bytes_per_token"]


def _itemsize(model_dtype: torch.dtype | int) -> int:
    if isinstance(model_dtype, int):
        return model_dtype
    return torch.empty((), dtype=model_dtype).element_size()


def bytes_per_block_per_head(head_dim: int, kv_cache_dtype: str, block_size: int | None = None,
                             model_dtype: torch.dtype | int = torch.bfloat16) -> int:
    """Bytes one block of `block_size` tokens costs for one layer and one KV head, keys + values
    (`block_size` None: the format's `DEFAULT_BLOCK_SIZE`)."""
    check_kv_cache_dtype(kv_cache_dtype)
    block_size = DEFAULT_BLOCK_SIZE[kv_cache_dtype] if block_size is None else block_size
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    D = head_dim
    if kv_cache_dtype == "auto":
        per_token = 2 * D * _itemsize(model_dtype)
        return block_size * per_token
    if kv_cache_dtype == "int8":  # int8 codes + one float16 scale per token, for K and for V
        return block_size * 2 * (D + 2)
    if kv_cache_dtype == "fp8":  # fp8 codes; the scales are per layer (4 bytes per head), not per token
        return block_size * 2 * D
    # int4 / int2 (KIVI): 4- or 2-bit codes; keys: float16 scale + zero per channel per block;
    # values: float16 scale + zero per token per VALUE_GROUP channels.
    codes = block_size * 2 * (D * int4.FORMAT_BITS[kv_cache_dtype] // 8)
    key_meta = 2 * 2 * D
    value_meta = block_size * 2 * 2 * (D // int4.value_group(D))
    return codes + key_meta + value_meta


def bytes_per_block(config, kv_cache_dtype: str = "auto", block_size: int | None = None,
                    model_dtype: torch.dtype | int = torch.bfloat16) -> int:
    """Bytes of one paged block (all layers, all KV heads, K and V, scales included).

    `config` is anything with `num_layers`, `num_kv_heads` and `head_dim` (a LlamaConfig).
    `model_dtype` (a dtype or its size in bytes) only matters for "auto". An engine divides its
    memory budget by this number to size its block pool.
    """
    per_head = bytes_per_block_per_head(config.head_dim, kv_cache_dtype, block_size, model_dtype)
    return config.num_layers * config.num_kv_heads * per_head


def bytes_per_token(config, kv_cache_dtype: str = "auto", block_size: int | None = None,
                    model_dtype: torch.dtype | int = torch.bfloat16) -> float:
    """KV-cache bytes per token (all layers, K and V) including scales and zero points.

    A float, because int4 key scales are per block: with block_size 16 they add 16 bytes per token
    and head, with 32 (int4's default) they add 8. Not counted: fp8's per-layer scales (a few bytes per layer, not
    per token) and int4's residual rows (full-precision blocks; kvlab/engine/kv_budget.py counts
    them in the engine's budget).
    """
    block_size = DEFAULT_BLOCK_SIZE[check_kv_cache_dtype(kv_cache_dtype)] if block_size is None else block_size
    return bytes_per_block(config, kv_cache_dtype, block_size, model_dtype) / block_size
