"""Paged decode attention, version 1: one program per (sequence, query head).

Decode has one new query per sequence. Program (s, h) loads q[s, h] ([D]), then walks sequence
s's block table one block at a time: block j holds tokens j*BS .. j*BS+BS-1, so the program reads
the K tile [BS, D] of KV head h // group at `k_cache[block_tables[s, j], :, h // group, :]`, scores
it against q, and folds the scores into a running softmax (the online softmax of Milakov &
Gimelshein, 2018, "Online normalizer calculation for softmax"; used for attention by Dao et al.,
2022, "FlashAttention"):

    m_new = max(m, max_j s_j)          running maximum
    l     = l * exp(m - m_new) + sum_j exp(s_j - m_new)
    acc   = acc * exp(m - m_new) + sum_j exp(s_j - m_new) * v_j
    out   = acc / l                    after the last block

Only the last block can be partly filled; tokens at positions >= context_len are masked out (their
scores become -inf, their loads are skipped). The block table's -1 padding is never read.

What is slow about it: with grouped-query attention, the `group` query heads that share a KV head
are separate programs, so each K/V tile is read `group` times, and the dot products are vector
multiply + sum, not matrix instructions. Version 2 fixes both.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels._checks import FLOAT_DTYPES, check_head_dim, check_tensor, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _decode_v1_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, out_ptr, qk_scale,
                      Hq, max_blocks, stride_cb, stride_ct,
                      GROUP: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    kvh = h // GROUP
    ctx = tl.load(ctx_ptr + s)
    d = tl.arange(0, D)
    t = tl.arange(0, BLOCK_T)                                   # token offsets inside a block
    q = tl.load(q_ptr + (s * Hq + h) * D + d).to(tl.float32)
    q = q * qk_scale                                            # scale * log2(e): we use exp2

    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for j in range(0, tl.cdiv(ctx, BLOCK_SIZE)):
        blk = tl.load(bt_ptr + s * max_blocks + j).to(tl.int64)
        valid = (t < BLOCK_SIZE) & (j * BLOCK_SIZE + t < ctx)
        off = blk * stride_cb + t[:, None] * stride_ct + kvh * D + d[None, :]
        k = tl.load(kc_ptr + off, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1)                 # [BLOCK_T]
        scores = tl.where(valid, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new)
        v = tl.load(vc_ptr + off, mask=valid[:, None], other=0.0).to(tl.float32)
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)                          # context 0: zeros, not NaN
    tl.store(out_ptr + (s * Hq + h) * D + d, out.to(out_ptr.dtype.element_ty))


def check_decode_args(q, k_cache, v_cache, block_tables, context_lens, float_cache=True,
                      packed=False):
    """Shapes, dtypes, devices and contiguity of a paged decode launch; returns (S, Hq, Hkv, D, BS).
    `packed`: an int4 or int2 cache, two or four channels per byte (last dimension D / 2 or D / 4)."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    S, Hq, D = q.shape
    check_head_dim(D)
    check_tensor("k_cache", k_cache, ndim=4, device=q.device)
    NB, BS, Hkv, Dk = k_cache.shape
    if packed and Dk * 2 != D and Dk * 4 != D:
        raise ValueError(f"a packed k_cache holds two channels per byte (int4) or four (int2): its "
                         f"last dimension must be q's head dim / 2 = {D // 2} or head dim / 4 = "
                         f"{D // 4}, got {Dk}")
    if not packed and Dk != D:
        raise ValueError(f"k_cache head dim {Dk} does not match q head dim {D}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if float_cache and k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache dtype {k_cache.dtype} must equal q dtype {q.dtype} "
                        "(this kernel reads an unquantized cache)")
    check_tensor("v_cache", v_cache, dtypes=(k_cache.dtype,), shape=tuple(k_cache.shape),
                 device=q.device)
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2, shape=(S,),
                 device=q.device)
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), shape=(S,), device=q.device)
    if context_lens.dim() != 1:
        raise ValueError(f"context_lens must be 1-D [S], got shape {tuple(context_lens.shape)}")
    return S, Hq, Hkv, D, BS


def paged_decode_attention_v1(q, k_cache, v_cache, block_tables, context_lens, scale,
                              out=None):
    """q [S, Hq, D]; caches [NB, BS, Hkv, D] (q's dtype); block_tables int32 [S, M];
    context_lens int32 [S] -> [S, Hq, D]."""
    S, Hq, Hkv, D, BS = check_decode_args(q, k_cache, v_cache, block_tables, context_lens)
    out = torch.empty_like(q) if out is None else out
    if S == 0:
        return out
    _decode_v1_kernel[(S, Hq)](q, k_cache, v_cache, block_tables, context_lens, out,
                               scale * LOG2E, Hq, block_tables.shape[1],
                               k_cache.stride(0), k_cache.stride(1),
                               GROUP=Hq // Hkv, Hkv=Hkv, D=D, BLOCK_SIZE=BS,
                               BLOCK_T=max(16, next_pow2(BS)))
    return out
