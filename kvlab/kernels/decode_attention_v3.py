"""Paged decode attention, version 3: split-K ("flash-decoding") with fused dequantization.

Version 2 runs S * Hkv programs; at small batch that leaves most of a GPU idle while a few
programs walk a long context. Flash-decoding (Dao, Haziza, Massa & Sizov, 2023, "Flash-Decoding
for long-context inference") also splits the *context*: program (s, g, p) handles tokens
[p * PART, (p + 1) * PART) exactly like version 2 and writes its partial result

    o_p = acc_p / l_p   [BLOCK_G, D]      and      lse_p = m_p + log2(l_p)   (base 2)

A second, tiny kernel merges the partitions of each (sequence, query head): with M = max_p lse_p,

    out = sum_p 2^(lse_p - M) * o_p  /  sum_p 2^(lse_p - M)

which is exact: 2^lse_p is partition p's softmax denominator, so the weights restore the global
softmax. Partitions past a sequence's context write lse = -inf and weigh nothing.

Fused dequantization: decode is bound by the bytes it reads (docs: chapter 10's roofline), so a
cache stored in 8 bits halves its time only if the kernel reads the 8-bit values directly. The
tile is converted in registers, and the scales are folded where they cost least:
  int8  (per token, per KV head float16 scale): scores = (Q @ K_int^T) * k_scale[token], and V's scale
        multiplies the probabilities before P @ V_int. Integers up to 127 are exact in bf16/fp16.
  fp8   (per tensor or per KV head scale): scores *= k_scale[kvh]; the output *= v_scale[kvh].
  int4  (KIVI, kvlab.quant.int4; layout in reshape_and_cache_int4): each token's D/2 bytes are
        loaded once and split into low and high nibbles, interleaved back into channel order
        (tl.interleave), and the tile is dequantized in registers, x = q * scale + zero: keys with
        their block's per-channel scale/zero [D], values with the token's per-group scale/zero
        [D/32], widened to [D]. Tokens of a block that still has a residual row (res_slot[block]
        >= 0: the partial last block, or one sealed this step) are read in full precision from the
        residual pool instead, as kvlab.cache.quantized reads its residual window; only tiles that
        reach such a block load from the pool. The dots see the numbers kvlab.quant.int4
        dequantizes.
  int2  (KIVI's 2-bit setting) the same tile with four codes per byte, unpacked by two rounds of
        tl.interleave; the cache's last dimension (D / 4 instead of D / 2) selects it.
Attention sinks (optional, any format; the pool is described in reshape_and_cache): if
sink_slot[block_tables[s, 0]] >= 0, sequence s's token at position 0 is read in full precision
from that row of sink_k, sink_v [R, Hkv, D] (q's dtype) instead of from the cache. Only the tile
that holds position 0 (start == 0, in partition 0) loads it; the other tiles skip the branch.
Its score q . k_sink * scale and its share p_0 * v_sink of the output are computed in float32
next to the dots, and its column of the tile's dots is zeroed (so the cache's copy of position 0,
whatever it holds, is never used). No scale applies to the sink: int8's per-token k and v
scales are simply not multiplied in; fp8 folds k_scale into the scores' scale, so the sink's
score uses the unfolded one, and multiplies the whole output by v_scale at the end, so v_sink
is divided by v_scale first (float32, rounded to nearest: with the final product, two roundings
of at most 2**-24 relative each, far below the dots' error); int4 and int2 tiles are float32
values already, and a model-dtype cache has no scales. For fp8 with smoothed keys the pool holds
k - shift, like the cache, and softmax ignores the q . shift that every score lacks.

With a bf16 q the two dots of a quantized cache run in fp16: int8 codes and e4m3 values are exact
in fp16, which converts from them in fewer instructions than bf16 does, and dequantized int4
values keep 3 more mantissa bits than bf16 (q and int4 values must then fit fp16's range,
|x| < 65504: int4 already requires it, and every model we serve meets it for q). A single
partition writes the output directly.

Sliding-window layers (`sliding_window=W`): a query at cache index ctx - 1 sees the indices
ctx - W .. ctx - 1 only. Each partition starts its loop at the tile holding ctx - W (partitions
wholly before it write lse = -inf and weigh nothing) and masks the indices before it, so the
blocks out of the window are never read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels._checks import check_sink, next_pow2
from kvlab.kernels.decode_attention_v1 import LOG2E, check_decode_args
from kvlab.kernels.reshape_and_cache import FMT_FLOAT, FMT_INT4, cache_format, check_scales
from kvlab.kernels.reshape_and_cache_int4 import check_int4_cache, value_group


@triton.jit
def _int8_to_fp16(x):
    """int8 -> fp16 without the (slow) integer-to-float unit: 0x6480 + x is the bit pattern of the
    fp16 number 1024 + (x + 128) (exponent of 1024, mantissa x + 128), so subtracting 1152 leaves x.
    Exact: every value in [1024, 1280) is an fp16 integer."""
    bits = x.to(tl.int16) + 0x6480
    return bits.to(tl.float16, bitcast=True) - 1152.0


@triton.jit
def _unpack(c, BITS: tl.constexpr):
    """Bytes [N, E] -> codes [N, E * 8 / BITS] in channel order (kvlab.quant.int4.unpack_codes).
    int4: low nibble = even channel. int2: channel 4j + i in bits 2i; interleaving (c0, c2) with
    (c1, c3) puts them in the order c0 c1 c2 c3 of each byte."""
    if BITS == 4:
        return tl.interleave(c & 15, c >> 4)
    else:
        return tl.interleave(tl.interleave(c & 3, (c >> 4) & 3),
                             tl.interleave((c >> 2) & 3, c >> 6))


@triton.jit
def _int4_tile(c_ptr, s_ptr, z_ptr, r_ptr, rs_ptr, blk, off, valid, kvh,
               Hkv: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
               KEYS: tl.constexpr, VG: tl.constexpr, BITS: tl.constexpr):
    """Dequantized int4 / int2 tile [BLOCK_N, D] (float32); rows of residual blocks from the pool."""
    rrow = tl.load(rs_ptr + blk, mask=valid, other=-1)             # residual row, or -1: sealed
    quant = valid & (rrow < 0)
    tok = blk * BLOCK_SIZE + off
    E: tl.constexpr = D * BITS // 8                                # bytes per token and head
    e = tl.arange(0, E)
    c = tl.load(c_ptr + ((tok * Hkv + kvh) * E)[:, None] + e[None, :],   # [NB, BS, Hkv, E]
                mask=quant[:, None], other=0)
    code = _unpack(c, BITS).to(tl.float32)
    if KEYS:   # per block, per channel: scale, zero [NB, Hkv, D]
        sz = (blk * Hkv + kvh)[:, None] * D + tl.arange(0, D)[None, :]
        sc = tl.load(s_ptr + sz, mask=quant[:, None], other=0.0).to(tl.float32)
        zp = tl.load(z_ptr + sz, mask=quant[:, None], other=0.0).to(tl.float32)
    else:      # per token, per group of VG channels: [NB, BS, Hkv, D / VG], widened to [.., D]
        sz = ((tok * Hkv + kvh) * (D // VG))[:, None] + tl.arange(0, D // VG)[None, :]
        sc = tl.load(s_ptr + sz, mask=quant[:, None], other=0.0).to(tl.float32)
        zp = tl.load(z_ptr + sz, mask=quant[:, None], other=0.0).to(tl.float32)
        sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (BLOCK_N, D // VG, VG)), (BLOCK_N, D))
        zp = tl.reshape(tl.broadcast_to(zp[:, :, None], (BLOCK_N, D // VG, VG)), (BLOCK_N, D))
    x = code * sc + zp
    if tl.max(rrow, axis=0) >= 0:   # the tile reaches a block still in the residual pool
        res = valid & (rrow >= 0)
        r = ((tl.maximum(rrow, 0).to(tl.int64) * BLOCK_SIZE + off) * Hkv + kvh) * D  # [R, BS, Hkv, D]
        xr = tl.load(r_ptr + r[:, None] + tl.arange(0, D)[None, :], mask=res[:, None], other=0.0)
        x = tl.where(res[:, None], xr.to(tl.float32), x)
    return x


@triton.jit
def _decode_v3_partition_kernel(q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr, kr_ptr,
                                vr_ptr, rs_ptr, sk_ptr, sv_ptr, ss_ptr, bt_ptr, ctx_ptr,
                                po_ptr, plse_ptr, qk_scale, max_blocks, num_parts, window,
                                stride_cb, stride_ct, stride_sb, stride_st,
                                GROUP: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr,
                                BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                                BLOCK_N: tl.constexpr, PART: tl.constexpr, FMT: tl.constexpr,
                                SCALE_STRIDE_H: tl.constexpr, PRECISION: tl.constexpr,
                                FP16_DOT: tl.constexpr, DIRECT: tl.constexpr, VG: tl.constexpr,
                                BITS: tl.constexpr, SINK: tl.constexpr, WINDOW: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(ctx_ptr + s)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    gmask = g < GROUP
    hq = kvh * GROUP + g
    q = tl.load(q_ptr + (s * Hkv * GROUP + hq)[:, None] * D + d[None, :], mask=gmask[:, None],
                other=0.0)
    if FP16_DOT:  # quantized cache, bf16 q: int8 and fp8 convert to fp16 in fewer instructions
        q = q.to(tl.float16)
    dot_ty = q.dtype
    sink_scale = qk_scale       # the sink's scores: no k scale (fp8 folds one into qk_scale)
    if FMT == 2:  # fp8: one K scale per KV head (stride 0: per tensor) folds into the score scale
        qk_scale = qk_scale * tl.load(ks_ptr + kvh * SCALE_STRIDE_H)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    end = tl.minimum(ctx, (part + 1) * PART)
    lo = part * PART
    if WINDOW:  # the first index in the window, and the tile holding it (never an empty tile)
        first = tl.maximum(ctx - window, 0)
        lo = tl.maximum(lo, (first // BLOCK_N) * BLOCK_N)
    for start in range(lo, end, BLOCK_N):
        pos = start + n
        valid = pos < end
        if WINDOW:
            valid = valid & (pos >= first)
        blk = tl.load(bt_ptr + s * max_blocks + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        tok = blk * BLOCK_SIZE + pos % BLOCK_SIZE                 # flat slot of each token
        row = blk * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kvh * D
        if FMT == 3:
            k = _int4_tile(kc_ptr, ks_ptr, kz_ptr, kr_ptr, rs_ptr, blk, pos % BLOCK_SIZE, valid, kvh,
                           Hkv, D, BLOCK_SIZE, BLOCK_N, True, VG, BITS)
        else:
            k = tl.load(kc_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if FMT == 1:
            k = _int8_to_fp16(k)
        scores = tl.dot(q, tl.trans(k.to(dot_ty)), input_precision=PRECISION) * qk_scale
        if FMT == 1:
            k_sc = tl.load(ks_ptr + tok * Hkv + kvh, mask=valid, other=0.0).to(tl.float32)
            scores = scores * k_sc[None, :]
        if SINK:
            sink = n < 0                                # which column is a sink: none so far
            vs0 = tl.zeros([D], tl.float32)
            if start == 0:      # the tile holding position 0 (partition 0's first): else no cost
                srow = tl.load(ss_ptr + tl.load(bt_ptr + s * max_blocks)).to(tl.int64)
                sink = (n == 0) & (srow >= 0)
                row0 = (tl.maximum(srow, 0) * Hkv + kvh) * D + d     # sink_k, sink_v [R, Hkv, D]
                ks0 = tl.load(sk_ptr + row0, mask=(d * 0 + srow) >= 0, other=0.0).to(tl.float32)
                vs0 = tl.load(sv_ptr + row0, mask=(d * 0 + srow) >= 0, other=0.0).to(tl.float32)
                if FMT == 2:    # the output is multiplied by v_scale at the end: divide it out
                    vs0 = tl.math.div_rn(vs0, tl.load(vs_ptr + kvh * SCALE_STRIDE_H))
                q32 = tl.load(q_ptr + (s * Hkv * GROUP + hq)[:, None] * D + d[None, :],
                              mask=gmask[:, None], other=0.0).to(tl.float32)
                s0 = tl.sum(q32 * ks0[None, :], axis=1) * sink_scale       # [BLOCK_G], float32
                scores = tl.where(sink[None, :], s0[:, None], scores)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if SINK:
            if start == 0:      # the sink's share of the output, in float32, outside the dot
                p0 = tl.sum(tl.where(sink[None, :], p, 0.0), axis=1)       # [BLOCK_G]
                acc += p0[:, None] * vs0[None, :]
        if FMT == 3:
            v = _int4_tile(vc_ptr, vs_ptr, vz_ptr, vr_ptr, rs_ptr, blk, pos % BLOCK_SIZE, valid, kvh,
                           Hkv, D, BLOCK_SIZE, BLOCK_N, False, VG, BITS)
        else:
            v = tl.load(vc_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if FMT == 1:
            v_sc = tl.load(vs_ptr + tok * Hkv + kvh, mask=valid, other=0.0).to(tl.float32)
            p = p * v_sc[None, :]
            v = _int8_to_fp16(v)
        v = v.to(dot_ty)
        if SINK:
            if start == 0:      # the cache's copy of position 0 takes no part (even if NaN)
                p = tl.where(sink[None, :], 0.0, p)
                v = tl.where(sink[:, None], 0.0, v)
        acc += tl.dot(p.to(dot_ty), v, input_precision=PRECISION)
        m = m_new
    if FMT == 2:
        # V's scale is the same for every token of the head: scale the sum once, at the end.
        acc = acc * tl.load(vs_ptr + kvh * SCALE_STRIDE_H)
    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    if DIRECT:  # a single partition: this is the final output, no reduce needed
        tl.store(po_ptr + (s * Hkv * GROUP + hq)[:, None] * D + d[None, :],
                 o.to(po_ptr.dtype.element_ty), mask=gmask[:, None])
    else:
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        base = (s * Hkv * GROUP + hq) * num_parts + part          # partials [S, Hq, P, D]
        tl.store(po_ptr + base[:, None] * D + d[None, :], o, mask=gmask[:, None])
        tl.store(plse_ptr + base, lse, mask=gmask)


@triton.jit
def _decode_v3_reduce_kernel(po_ptr, plse_ptr, out_ptr, num_parts,
                             D: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)                           # one (sequence, query head)
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, D)
    pmask = p < num_parts
    lse = tl.load(plse_ptr + row * num_parts + p, mask=pmask, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    w = tl.exp2(lse - mx)                                         # 0 for empty partitions
    o = tl.load(po_ptr + (row * num_parts + p)[:, None] * D + d[None, :], mask=pmask[:, None],
                other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_partition(S: int, Hkv: int, max_ctx: int, block_n: int, device) -> int:
    """Tokens per partition: no split when S * Hkv programs already cover the multiprocessors;
    otherwise enough partitions to fill them about twice, but never a partition shorter than 4
    tiles (each one costs a partial write and its share of the reduce)."""
    tiles = max(1, triton.cdiv(max_ctx, block_n))
    sms = _num_sms(device)
    if S * Hkv >= sms:                  # already one program per multiprocessor or more: no split
        return tiles * block_n
    want = triton.cdiv(2 * sms, S * Hkv)
    parts = max(1, min(want, triton.cdiv(tiles, 4)))
    return triton.cdiv(tiles, parts) * block_n


def paged_decode_attention_v3(q, k_cache, v_cache, block_tables, context_lens, scale,
                              k_scale=None, v_scale=None, out=None, partition_size=None,
                              block_n=64, num_warps=4, num_stages=2, k_zero=None, v_zero=None,
                              k_res=None, v_res=None, res_slot=None, sink_k=None, sink_v=None,
                              sink_slot=None, sliding_window=None):
    """q [S, Hq, D]; caches [NB, BS, Hkv, D] in q's dtype, int8 or float8_e4m3fn (then with
    k_scale/v_scale as in docs/architecture.md section 4) -> [S, Hq, D] in q's dtype.
    int4: uint8 caches [NB, BS, Hkv, D/2] (int2: [NB, BS, Hkv, D/4]) with k_scale, k_zero
    [NB, Hkv, D], v_scale, v_zero [NB, BS, Hkv, D/32] (float16), the residual pool k_res, v_res
    [R, BS, Hkv, D] in q's dtype and res_slot int32 [NB] (reshape_and_cache_int4).
    Any format: the attention-sink pool sink_k, sink_v [R, Hkv, D] in q's dtype and sink_slot
    int32 [NB], all three or none (module docstring; rows must lie in [0, R), unchecked).
    `sliding_window` W (an int >= 1, or None): each query sees only its context's last W indices.

    The grid is sized from block_tables.shape[1] * BS (an upper bound on the context that needs
    no device-to-host sync); `partition_size` (a multiple of block_n) overrides the heuristic.
    """
    fmt = cache_format(k_cache)
    S, Hq, Hkv, D, BS = check_decode_args(q, k_cache, v_cache, block_tables, context_lens,
                                          float_cache=fmt == FMT_FLOAT, packed=fmt == FMT_INT4)
    int4 = (k_zero, v_zero, k_res, v_res, res_slot)
    bits = 4
    if fmt == FMT_INT4:
        bits = check_int4_cache(k_cache, v_cache, k_scale, v_scale, *int4, D, model_dtype=q.dtype)[3]
        per_head = 0
    else:
        if any(t is not None for t in int4):
            raise ValueError("k_zero, v_zero, k_res, v_res, res_slot are only for an int4 or int2 "
                             f"(uint8) cache, not {k_cache.dtype}")
        per_head = check_scales(fmt, k_cache, k_scale, v_scale)
    sink = check_sink(sink_k, sink_v, sink_slot, H=Hkv, D=D, NB=k_cache.shape[0], dtype=q.dtype,
                      device=q.device)
    w = sliding_window
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
        raise ValueError(f"sliding_window must be an integer >= 1 or None, got {w!r}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    out = torch.empty_like(q) if out is None else out
    if S == 0:
        return out
    max_ctx = block_tables.shape[1] * BS
    part = partition_size or choose_partition(S, Hkv, max_ctx, block_n, q.device)
    if part % block_n:
        raise ValueError(f"partition_size ({part}) must be a multiple of block_n ({block_n})")
    P = max(1, triton.cdiv(max_ctx, part))
    if P == 1:
        po, plse = out, out                      # the partition kernel writes the output itself
    else:
        po = torch.empty(S, Hq, P, D, device=q.device, dtype=torch.float32)
        plse = torch.empty(S, Hq, P, device=q.device, dtype=torch.float32)
    qk_scale = scale * LOG2E
    dummy = context_lens
    opt = [t if t is not None else dummy
           for t in (k_scale, v_scale, *int4, sink_k, sink_v, sink_slot)]
    _decode_v3_partition_kernel[(S, Hkv, P)](
        q, k_cache, v_cache, *opt, block_tables, context_lens, po, plse,
        qk_scale, block_tables.shape[1], P, w or 0, k_cache.stride(0), k_cache.stride(1),
        BS * Hkv, Hkv, GROUP=Hq // Hkv, Hkv=Hkv, D=D, BLOCK_SIZE=BS,
        BLOCK_G=max(16, next_pow2(Hq // Hkv)), BLOCK_N=block_n, PART=part, FMT=fmt,
        SCALE_STRIDE_H=per_head, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FP16_DOT=fmt != FMT_FLOAT and q.dtype == torch.bfloat16, DIRECT=P == 1, VG=value_group(D),
        BITS=bits, SINK=sink, WINDOW=w is not None, num_warps=num_warps, num_stages=num_stages)
    if P > 1:
        _decode_v3_reduce_kernel[(S * Hq,)](po, plse, out, P, D=D, BLOCK_P=next_pow2(P))
    return out
