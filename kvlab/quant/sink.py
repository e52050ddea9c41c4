"""Attention-sink preservation: each sequence's first token kept in full precision beside a quantized cache.

Most attention heads of a trained LLM put a large share of their weight on the first token, the
*attention sink* (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks").
Its key is unlike the others: in SmolLM2 it is small while the mean key per channel is large, so
fp8 key smoothing (kvlab.quant.fp8) moves it far from zero (|k0| = 9, |k0 - mean| = 28), and in
int4 it widens the per-channel steps of every key in its group. An error on that one key moves
the score every later query gives it. KVQuant (Hooper et al., 2024) and IntactKV (Liu et al.,
2024) keep such tokens unquantized. kvlab measured it first in the contiguous twin
(`kvlab.quant.sim.FakeQuantKVCache(keep_first=n)`, benchmarks/results/sink_preservation.md): one
full-precision token per sequence takes smoothed fp8 from +0.87 % to +0.51 % perplexity, int4
from +0.67 % to +0.33 % and int2 from +26.8 % to +15.5 %; more kept tokens add little.

`kvlab.LLM(kv_cache_dtype=..., keep_sink_token=True)` does the same in the paged cache:

    sink_k, sink_v   one [R, Hkv, D] pool per layer, in the model dtype: one token a row
    sink_slot        int32 [NB], shared by the layers: the row of block b's offset-0 token, or -1

A row belongs to a *block*, the first block of a sequence (its block table's column 0), and is
given in the step that writes that block's offset 0, the sequence's position 0 (`sink_blocks`).
The token is still quantized into its block as usual; it is also stored unquantized in its row
(fp8: minus the key shift, like every stored key), and every read of position 0 takes the row.
int4 and int2 quantize a first block's keys with scales from its other tokens
(`int4.quantize_keys(skip_first=True)`), so the sink no longer sets the step size of the rest.

With prefix caching, a cached first block keeps its row, so a later request that hits the block
finds its sink too (block hashes are chained from the first block, so a block cached at
position 0 is only ever found at position 0). The row goes back when the block manager drops the
block's contents: freed without a hash, or evicted (it reaches the cache in the next step's
`freed_blocks`, docs/architecture.md section 3).

Cost: one token in the model dtype per running sequence and per cached first block
(`QuantizedPagedKVCache.sink_bytes`): for SmolLM2 in bfloat16, 23,040 bytes a row (the bytes of
3.2 int4 tokens; the token is stored quantized too). In the engine the rows are preallocated inside
the KV budget, `min(num_blocks, 2 * max_num_seqs)` of them, and the block manager keeps at most
`max_num_seqs` free cached first blocks, evicting the oldest beyond that
(kvlab/engine/kv_budget.py), so the pool never runs out and never grows.
"""
from __future__ import annotations

import torch

from kvlab.quant.residual import Int4Residual


def sink_blocks(block_tables: torch.Tensor, slot_mapping: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block ids this step writes at offset 0 that are a sequence's first block: the blocks
    whose offset-0 token is a sink."""
    first = block_tables[:, 0]
    first = first[first >= 0].long()
    s = slot_mapping[slot_mapping >= 0]
    starts = s[s % block_size == 0] // block_size
    return first[torch.isin(first, starts)].unique()


def create_sink_pool(num_layers: int, num_blocks: int, num_kv_heads: int, head_dim: int,
                     dtype: torch.dtype = torch.float32, device="cpu", rows: int = 16,
                     fixed: bool = False) -> Int4Residual:
    """The sink rows of every layer: a pool of one-token rows with the residual pool's bookkeeping
    (kvlab.quant.residual: `assign` hands out rows, `discard` takes them back, it grows and shrinks).
    Its `k_res[layer]` is [R, 1, Hkv, D]; `sink_args` gives the kernels' [R, Hkv, D] views."""
    return Int4Residual.create(num_layers, num_blocks, 1, num_kv_heads, head_dim, dtype, device, rows, fixed)


def sink_args(pool: Int4Residual, layer: int) -> dict:
    """The sink keyword arguments of the kvlab.attention.paged_triton kernels for one layer."""
    return dict(sink_k=pool.k_res[layer].squeeze(1), sink_v=pool.v_res[layer].squeeze(1),
                sink_slot=pool.res_slot)
