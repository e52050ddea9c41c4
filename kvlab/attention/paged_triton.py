"""Paged attention on the Triton kernels of kvlab/kernels/, with the signatures of paged_torch.

    reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)                 cache write
    paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale)

Quantized caches (int8, float8_e4m3fn) take two extra keyword arguments, `k_scale` and `v_scale`
(docs/architecture.md, section 4); for a model-dtype cache they stay None. An int4 cache (uint8,
two channels per byte) takes k_scale, v_scale and five more: k_zero, v_zero, the full-precision
residual pool k_res, v_res [R, BS, Hkv, D] and res_slot int32 [NB] (block -> residual row, -1 once
quantized); kvlab/kernels/reshape_and_cache_int4.py describes them. An int2 cache is the same with
four channels per byte (last dimension D/4). The int4 write quantizes a
block as soon as its last slot is written but leaves its residual row mapped, so this step's
attention still reads it in full precision, as kvlab.cache.quantized does; after the attention the
caller unmaps the blocks `int4_sealed_blocks(slot_mapping, block_size)` names. `Int4Residual`
(kvlab.quant.residual, re-exported here) does that bookkeeping for a whole model: `open` before a
step's first layer, `close` after its last, `args(layer)` for the kernels in between.
Every format also takes an optional attention-sink pool, all three or none: sink_k, sink_v
[R, Hkv, D] in the model dtype and sink_slot int32 [NB] (block -> the pool row of its offset-0
token, -1 for none). The write stores each sequence's first token there unquantized, and decode
and prefill read position 0 from it (kvlab/kernels/reshape_and_cache.py, decode_attention_v3.py).
kvlab.cache.quantized.QuantizedPagedKVCache calls these entry points with its quantized blocks when
its attention backend is "triton".

Decode uses version 3 (split-K with fused dequantization). Prefill over cached prefix blocks
reuses the same kernel: query i of sequence s, at absolute position context_len - q_len + i, is a
decode query whose own context is that position + 1 tokens of s's block table. Each packed token
becomes one row of a per-token block table and length, and one launch serves the whole packed
batch. That is exact and reads each K/V tile once per query token and KV head, which is fine for
the chunk sizes this engine schedules; a prefill kernel tiled over queries as well (FlashAttention
style) would read each tile once per query *tile* and is the next step for long prompts.

Sliding-window layers: both attention entry points take `sliding_window=W` (keyword, default
None), passed to the kernel, which starts each query's loop at the tile holding its first
in-window index (for prefill, each token's own context ends at its position, so the same rule
gives the band mask).
"""
from __future__ import annotations

import torch

from kvlab.kernels._checks import check_tensor
from kvlab.kernels.decode_attention_v3 import paged_decode_attention_v3
from kvlab.kernels.reshape_and_cache import reshape_and_cache as _reshape_and_cache
from kvlab.kernels.reshape_and_cache_int4 import sealed_blocks as int4_sealed_blocks
from kvlab.quant.residual import Int4Residual

__all__ = ["reshape_and_cache", "paged_decode_attention", "paged_prefill_attention",
           "int4_sealed_blocks", "Int4Residual"]


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None, *,
                      k_zero=None, v_zero=None, k_res=None, v_res=None, res_slot=None,
                      sink_k=None, sink_v=None, sink_slot=None, check_slots: bool = True) -> None:
    """Write k, v [N, Hkv, D] into the slots `slot_mapping` [N] int64 (< 0: skipped).
    `check_slots` (int4/int2 only): check on the host that every written block has a residual row."""
    _reshape_and_cache(k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping, k_scale, v_scale,
                       sink_k=sink_k, sink_v=sink_v, sink_slot=sink_slot, k_zero=k_zero, v_zero=v_zero,
                       k_res=k_res, v_res=v_res, res_slot=res_slot, check_slots=check_slots)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                           k_scale=None, v_scale=None, *, k_zero=None, v_zero=None, k_res=None,
                           v_res=None, res_slot=None, sink_k=None, sink_v=None,
                           sink_slot=None, sliding_window=None) -> torch.Tensor:
    """One query per sequence, q [S, Hq, D] -> [S, Hq, D]."""
    return paged_decode_attention_v3(q.contiguous(), k_cache, v_cache, block_tables,
                                     context_lens, scale, k_scale=k_scale, v_scale=v_scale,
                                     k_zero=k_zero, v_zero=v_zero, k_res=k_res, v_res=v_res,
                                     res_slot=res_slot, sink_k=sink_k, sink_v=sink_v, sink_slot=sink_slot,
                                     sliding_window=sliding_window)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                            scale, k_scale=None, v_scale=None, *, k_zero=None, v_zero=None,
                            k_res=None, v_res=None, res_slot=None, sink_k=None, sink_v=None,
                            sink_slot=None, sliding_window=None) -> torch.Tensor:
    """Packed queries q [N, Hq, D]; sequence s owns rows query_start_loc[s]:query_start_loc[s+1],
    the last q_len positions of its context_lens[s] tokens -> [N, Hq, D]."""
    N = q.shape[0]
    S = context_lens.shape[0]
    check_tensor("query_start_loc", query_start_loc, dtypes=(torch.int32,), ndim=1,
                 shape=(S + 1,), device=q.device)
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), ndim=1, device=q.device)
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(S, device=q.device), q_lens, output_size=N)
    idx = torch.arange(N, device=q.device)
    first = (context_lens.long() - q_lens)[seq]                 # absolute position of row 0
    pos = first + idx - query_start_loc[:-1].long()[seq]
    tok_ctx = (pos + 1).to(torch.int32)
    tok_tables = block_tables[seq].contiguous()
    return paged_decode_attention_v3(q.contiguous(), k_cache, v_cache, tok_tables, tok_ctx,
                                     scale, k_scale=k_scale, v_scale=v_scale, k_zero=k_zero,
                                     v_zero=v_zero, k_res=k_res, v_res=v_res, res_slot=res_slot,
                                     sink_k=sink_k, sink_v=sink_v, sink_slot=sink_slot,
                                     sliding_window=sliding_window)
