"""Paged decode attention, version 2: GQA-packed, one program per (sequence, KV head).

In grouped-query attention (Ainslie et al., 2023, "GQA: Training Generalized Multi-Query Transformer
Models from Multi-Head Checkpoints") `group = Hq / Hkv` query heads share one KV head. Version 1
ran them as separate programs, so every K/V tile crossed the memory bus `group` times. Here
program (s, g) loads the group's queries as one tile Q [BLOCK_G, D] and reads each K/V tile once:

    S_tile = Q @ K_tile^T        [BLOCK_G, BLOCK_N]   one tl.dot (tensor cores on a GPU)
    acc    = acc * alpha + P @ V_tile                  a second tl.dot

Tiles are BLOCK_N tokens wide, independent of the block size: token p of the tile lives in block
`block_tables[s, p // BS]` at offset `p % BS`, so each row of the tile gathers its own address (a
block is BS * Hkv * D elements apart from the next, rows inside it Hkv * D apart). BLOCK_G is the
group padded to 16, the smallest side tl.dot accepts; the padded rows are zeros and never stored.

What is left: one program per (sequence, KV head) is S * Hkv programs. At batch 1 with 8 KV heads
that is 8 programs on a GPU with 132 multiprocessors: most of the chip idles while 8 programs
walk a long context. Version 3 splits the context.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels._checks import next_pow2
from kvlab.kernels.decode_attention_v1 import LOG2E, check_decode_args


@triton.jit
def _decode_v2_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, out_ptr, qk_scale,
                      max_blocks, stride_cb, stride_ct,
                      GROUP: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                      PRECISION: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    ctx = tl.load(ctx_ptr + s)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    gmask = g < GROUP
    hq = kvh * GROUP + g                                         # query heads of this group
    q_off = (s * Hkv * GROUP + hq)[:, None] * D + d[None, :]
    q = tl.load(q_ptr + q_off, mask=gmask[:, None], other=0.0)   # [BLOCK_G, D]

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for start in range(0, ctx, BLOCK_N):
        pos = start + n
        valid = pos < ctx
        blk = tl.load(bt_ptr + s * max_blocks + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = blk * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kvh * D   # [BLOCK_N]
        k = tl.load(kc_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


def paged_decode_attention_v2(q, k_cache, v_cache, block_tables, context_lens, scale,
                              out=None, block_n=64, num_warps=4, num_stages=2):
    """Same contract as version 1; `block_n` tokens per tile (a power of two >= 16)."""
    S, Hq, Hkv, D, BS = check_decode_args(q, k_cache, v_cache, block_tables, context_lens)
    out = torch.empty_like(q) if out is None else out
    if S == 0:
        return out
    _decode_v2_kernel[(S, Hkv)](q, k_cache, v_cache, block_tables, context_lens, out,
                                scale * LOG2E, block_tables.shape[1],
                                k_cache.stride(0), k_cache.stride(1),
                                GROUP=Hq // Hkv, Hkv=Hkv, D=D, BLOCK_SIZE=BS,
                                BLOCK_G=max(16, next_pow2(Hq // Hkv)), BLOCK_N=block_n,
                                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                                num_warps=num_warps, num_stages=num_stages)
    return out
