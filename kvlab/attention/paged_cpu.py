"""Paged attention for the CPU: the reference's gather-then-attend, with the query heads of each KV
head stacked as rows so that every call lands on PyTorch's fused CPU attention kernel.

`paged_torch` is the reference the chapters teach and every backend is tested against. It is
correct in every dtype, but on a CPU two of its calls fall off PyTorch's fused (flash) attention
kernel onto the unfused "math" path, which materialises the [queries, keys] score matrix per head
and runs several ops over it:

  - a whole prompt, attended as 3-D tensors [H, L, D]: only 4-D inputs [batch, H, L, D] take the
    fused CPU kernel; the math path measured 2-3x slower on the course machine for 256-token
    prompts (benchmarks/results/engine_cpu_vllm_notes.md);
  - grouped-query attention in bfloat16/float16 (`enable_gqa=True`, Hq > Hkv): the fused kernel
    broadcasts each KV head to its G = Hq / Hkv query heads, which in half precision measured
    about 10x slower per decode step than float32.

This backend computes the same attention without either. A prompt that is the whole context goes
to the fused kernel as 4-D causal attention. Everything else uses *grouped rows*: the G query heads
that share a KV head become G * q_len query rows of one attention over that KV head,

    q [q_len, Hq, D] -> [Hkv, G * q_len, D]      row g * q_len + i is head kv * G + g, query i

so no KV head is ever repeated, and the mask (a length mask for decode, causal over a cached
prefix for chunks) is the same for the G rows of one query. Query head h reads KV head h // G,
the convention of `repeat_kv` and of `enable_gqa`. Float32/float64 decode is left to the reference
(its fused GQA path is fast there); `HALF` lists the dtypes decoded as grouped rows.

Decode, and the single-token rows of a prefill step, read K/V in place from the block pool with
the C++ kernel of kvlab/kernels/cpu/ (compiled on first use; no gathered copy per layer) when the
cache holds the query's dtype; without a C++ compiler, or for a cache in another dtype, they take
the gather paths below, as does everything else: K/V gathered from the block table into
contiguous copies per step (as the reference does). Tested equal to the
reference on random inputs, float64 through the grouped path, and token-equal in the engine
(tests/test_attention_cpu.py). Sliding-window layers (`sliding_window=W`, as in paged_torch): decode
reads only the window's blocks (`paged_torch.window_context`), prefill masks grouped rows with the
band; tested in tests/test_sliding_window.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlab.attention import paged_torch
from kvlab.attention.paged_torch import gather_blocks, reshape_and_cache, sequence_contexts, window_context
from kvlab.kernels import cpu as cpu_kernels

__all__ = ["reshape_and_cache", "paged_decode_attention", "paged_prefill_attention", "grouped_attention",
           "HALF", "in_place_kernel"]

# dtypes whose decode runs as grouped rows (the fused kernel's GQA broadcast is slow in them)
HALF = (torch.bfloat16, torch.float16)


def in_place_kernel(q: torch.Tensor, k_cache: torch.Tensor):
    """The compiled in-place kernel when it serves these tensors (CPU, the cache in q's dtype,
    contiguous pools), else None (the gather paths)."""
    if q.device.type != "cpu" or k_cache.dtype != q.dtype or not k_cache.is_contiguous():
        return None
    return cpu_kernels.load()


def _in_place(kernel, q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, sliding_window):
    i32 = torch.int32
    with torch.profiler.record_function("kvlab::paged_attention_cpu"):   # named in torch.profiler tables
        return kernel.paged_attention(q, k_cache, v_cache, block_tables.to(i32), query_start_loc.to(i32),
                                      context_lens.to(i32), float(scale), int(sliding_window or 0))


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of grouped query rows over their KV head.

    q [S, Hkv, R, D] (R rows per KV head), k and v [S, Hkv, L, D], mask None or boolean,
    broadcastable to [S, Hkv, R, L] (True = attend) -> [S, Hkv, R, D]. Plain 4-D attention with as
    many query heads as KV heads: the fused CPU kernel's case.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, *, sliding_window: int | None = None) -> torch.Tensor:
    """As paged_torch.paged_decode_attention: q [S, Hq, D] over each sequence's context."""
    kernel = in_place_kernel(q, k_cache)
    if kernel is not None:
        qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32)
        return _in_place(kernel, q, k_cache, v_cache, block_tables, qsl, context_lens, scale, sliding_window)
    if q.dtype not in HALF:
        return paged_torch.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                  sliding_window=sliding_window)
    S, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    if sliding_window is not None:
        k, v, valid = window_context(k_cache, v_cache, block_tables, context_lens, sliding_window, q.dtype)
        out = grouped_attention(q.view(S, Hkv, G, D), k.transpose(1, 2), v.transpose(1, 2), scale,
                                valid.view(S, 1, 1, -1))
        return out.reshape(S, Hq, D)
    k = gather_blocks(k_cache, block_tables).to(q.dtype).transpose(1, 2)   # [S, Hkv, L, D]
    v = gather_blocks(v_cache, block_tables).to(q.dtype).transpose(1, 2)
    L = k.shape[2]
    mask = None
    if S == 1:                                               # one sequence: cut, no mask needed
        n = int(context_lens[0])
        k, v = k[:, :, :n], v[:, :, :n]
    else:
        valid = torch.arange(L, device=q.device).view(1, L) < context_lens.view(S, 1).to(q.device)
        mask = valid.view(S, 1, 1, L)                        # the same for every head and row
    out = grouped_attention(q.view(S, Hkv, G, D), k, v, scale, mask)       # [S, Hkv, G, D]
    return out.reshape(S, Hq, D)


def _prefix_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 sliding_window: int | None = None) -> torch.Tensor:
    """The last q_len positions of a context of L tokens: q [q_len, Hq, D], k/v [L, Hkv, D] ->
    [q_len, Hq, D]; query i sits at position L - q_len + i and sees keys 0 .. that position
    (with a window W, only the last W of them)."""
    q_len, Hq, D = q.shape
    L, Hkv = k.shape[0], k.shape[1]
    G = Hq // Hkv
    rows = q.view(q_len, Hkv, G, D).permute(1, 2, 0, 3).reshape(1, Hkv, G * q_len, D)   # (g, i) order
    pos = torch.arange(L - q_len, L, device=q.device).repeat(G)                         # [G * q_len]
    mask = torch.arange(L, device=q.device).view(1, L) <= pos.view(-1, 1)              # [G * q_len, L]
    if sliding_window is not None:
        mask &= torch.arange(L, device=q.device).view(1, L) > pos.view(-1, 1) - sliding_window
    out = grouped_attention(rows, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                            scale, mask)                                                # [1, Hkv, G*q, D]
    return out.view(Hkv, G, q_len, D).permute(2, 0, 1, 3).reshape(q_len, Hq, D)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            context_lens: torch.Tensor, scale: float, *,
                            sliding_window: int | None = None) -> torch.Tensor:
    """As paged_torch.paged_prefill_attention: packed queries q [N, Hq, D], one sequence at a time.

    A whole prompt (q_len == context_len) is 4-D causal attention on the fused kernel; a chunk over
    a cached prefix, or a decode token in a prefill batch, is grouped rows with a causal mask.
    With a window that cuts (context longer than W), grouped rows with the band mask.
    """
    N, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.empty_like(q)
    kernel = in_place_kernel(q, k_cache)
    if kernel is not None:               # single-token rows (decodes in a prefill step): in place
        qsl = query_start_loc.tolist()
        single = [s for s in range(len(qsl) - 1) if qsl[s + 1] - qsl[s] == 1]
        if single:
            rows = torch.tensor([qsl[s] for s in single], dtype=torch.int64)
            idx = torch.tensor(single, dtype=torch.int64)
            out[rows] = _in_place(kernel, q[rows], k_cache, v_cache, block_tables[idx],
                                  torch.arange(len(single) + 1, dtype=torch.int32), context_lens[idx],
                                  scale, sliding_window)
    for start, end, k, v in sequence_contexts(q, k_cache, v_cache, block_tables, query_start_loc,
                                              context_lens, sliding_window, min_q_len=1 if kernel is None else 2):
        q_len, L = end - start, k.shape[0]
        if sliding_window is not None and L > sliding_window:   # the band: grouped rows
            out[start:end] = _prefix_rows(q[start:end], k, v, scale, sliding_window)
        elif q_len == L and q_len > 1:   # a whole prompt: plain causal attention, 4-D
            o = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale, enable_gqa=Hq != Hkv)
            out[start:end] = o[0].transpose(0, 1)
        else:                            # the last q_len positions over a cached prefix
            out[start:end] = _prefix_rows(q[start:end], k, v, scale)
    return out
