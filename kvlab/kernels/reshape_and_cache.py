"""The cache write: scatter this step's new K and V rows into their paged slots, quantizing on the way.

One program per new token n. It reads k[n] and v[n] ([Hkv, D], one contiguous row each), and writes
them to slot `slot_mapping[n]`, i.e. block `slot // block_size`, offset `slot % block_size`, of the
caches [num_blocks, block_size, Hkv, D]. Because the cache is token-major inside a block, that is
one contiguous store of Hkv * D elements: the write is as cheap as a copy. Slots < 0 are padding
and nothing is written (vLLM's convention; Kwon et al., 2023, "Efficient Memory Management for
Large Language Model Serving with PagedAttention").

Formats (docs/architecture.md, section 4), picked by the cache dtype:
  model dtype        plain cast
  int8               symmetric per (token, KV head), as kvlab.quant.int8: scale = amax / 127 (at
                     least float16's smallest normal), rounded *up* to float16 and stored in
                     k_scale/v_scale float16 [NB, BS, Hkv]; q = round(x / scale) in -127..127
  float8_e4m3fn      x / scale with a fixed per-tensor [] or per-KV-head [Hkv] scale, saturated to
                     +-448 and rounded to the nearest e4m3 value, ties to even, in float32 (_e4m3)
                     so that the cast to float8 is exact on every target (Triton's interpreter
                     rounds some casts wrongly: carries into the exponent, subnormals)
  uint8 (int4, int2) KIVI's grouped format: keys are quantized per channel over a whole block, so
                     rows go to a full-precision residual pool first and a block is quantized when
                     its last slot is written; see reshape_and_cache_int4, which this dispatches to

Attention sinks (kvlab/quant/sink.py): a cache may keep each sequence's first token in full
precision in a small sink pool, sink_k, sink_v [R, Hkv, D] in the model dtype, with sink_slot
int32 [NB] naming the pool row of block b's offset-0 token (-1: none; the caller hands out rows,
the kernels only read them). A token written at offset 0 of a block with a row is also stored
there, as it arrives (fp8 with smoothed keys: k - shift), cast to the pool's dtype. Its quantized
store is unchanged, so the cache bytes are the same with sinks on or off; only the int4/int2 key
scales of a sink's block change (reshape_and_cache_int4).

Division: torch divides float32 with IEEE round-to-nearest; Triton's `/` on an NVIDIA GPU emits
the approximate div.full.f32 (up to 2 ulp off), so the kernels divide with tl.math.div_rn.
Rounding: `round` must be round-half-to-even to match torch.round bit for bit. Triton has no
portable rint, so we use the classic trick: for |x| < 2**22, (x + 1.5 * 2**23) - 1.5 * 2**23 rounds
x to the nearest integer, ties to even, because the sum has no bits left below the units place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels._checks import FLOAT_DTYPES, check_head_dim, check_sink, check_tensor, next_pow2

FMT_FLOAT, FMT_INT8, FMT_FP8, FMT_INT4 = 0, 1, 2, 3
_RINT_MAGIC = 12582912.0  # 1.5 * 2**23


@triton.jit
def _rint(x):
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _e4m3(y):
    """float32 y, |y| <= 448, rounded to the nearest float8 e4m3 value (ties to even), as float32.
    The e4m3 numbers between 2**e and 2**(e+1) are spaced 2**(e-3); below 2**-6 (subnormals) the
    spacing stays 2**-9. So y / spacing is rounded to an integer (_rint: ties to even, which is an
    even mantissa) and scaled back; both scalings are by powers of two, hence exact. A result of
    zero keeps y's sign, as torch's cast does (-0.0 is 0x80)."""
    e = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)   # floor(log2 |y|)
    step = ((e + 124) << 23).to(tl.float32, bitcast=True)                       # 2**(e - 3)
    inv = ((130 - e) << 23).to(tl.float32, bitcast=True)                        # 2**(3 - e)
    r = _rint(y * inv) * step
    return tl.where(r == 0.0, y * 0.0, r)


@triton.jit
def _quantize_store(x, cache_ptr, scale_ptr, dst, sdst, h, mask, hmask,
                    FMT: tl.constexpr, SCALE_STRIDE_H: tl.constexpr):
    """Quantize one token's [BLOCK_H, BLOCK_D] rows and store them (and their scales)."""
    if FMT == 0:
        tl.store(cache_ptr + dst, x.to(cache_ptr.dtype.element_ty), mask=mask)
    elif FMT == 1:
        amax = tl.max(tl.abs(x), axis=1)[:, None]             # [BLOCK_H, 1]
        scale = tl.maximum(tl.math.div_rn(amax, 127.0), 6.103515625e-05)  # float16's tiny
        s16 = scale.to(tl.float16)                            # round to nearest, then up if below
        bumped = (s16.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
        s16 = tl.where(s16.to(tl.float32) < scale, bumped, s16)
        q = _rint(tl.math.div_rn(x, s16.to(tl.float32)))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(cache_ptr + dst, q.to(tl.int8), mask=mask)
        tl.store(scale_ptr + sdst, s16, mask=hmask)
    else:
        s = tl.load(scale_ptr + h * SCALE_STRIDE_H, mask=hmask, other=1.0)  # stride 0: per tensor
        y = tl.math.div_rn(x, s)
        y = _e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
        tl.store(cache_ptr + dst, y.to(tl.float8e4nv), mask=mask)


@triton.jit
def _store_sink(k, v, sk_ptr, sv_ptr, ss_ptr, slot, h, d, mask, H,
                BLOCK_SIZE: tl.constexpr, D: tl.constexpr):
    """If the token took offset 0 of a block with a sink row (sink_slot[block] >= 0), also store
    its k, v [BLOCK_H, D] rows unquantized, in the sink pool's dtype, into that row."""
    srow = tl.load(ss_ptr + tl.maximum(slot, 0) // BLOCK_SIZE).to(tl.int64)
    first = tl.where((slot >= 0) & (slot % BLOCK_SIZE == 0), srow, -1)   # -1: not a sink
    mask = mask & ((h * 0 + first) >= 0)                         # (mask is False for slot < 0)
    dst = (tl.maximum(srow, 0) * H + h) * D + d                  # sink_k, sink_v [R, H, D]
    tl.store(sk_ptr + dst, k.to(sk_ptr.dtype.element_ty), mask=mask)
    tl.store(sv_ptr + dst, v.to(sv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reshape_and_cache_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
                              sk_ptr, sv_ptr, ss_ptr,
                              H, stride_cb, stride_ct, stride_sb, stride_st,
                              BLOCK_SIZE: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
                              FMT: tl.constexpr, SCALE_STRIDE_H: tl.constexpr,
                              SINK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + n)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D)[None, :]
    hmask = (h < H) & ((h * 0 + slot) >= 0)                      # slot < 0: padding, skip
    mask = hmask & (d < D)
    src = n * H * D + h * D + d                                  # k, v are contiguous [N, H, D]
    dst = blk * stride_cb + off * stride_ct + h * D + d
    sdst = blk * stride_sb + off * stride_st + h                 # int8 scales [NB, BS, H]
    k = tl.load(k_ptr + src, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + src, mask=mask, other=0.0).to(tl.float32)
    if SINK:   # float32 holds every float16 / bfloat16 value: the cast back is exact
        _store_sink(k, v, sk_ptr, sv_ptr, ss_ptr, slot, h, d, mask, H, BLOCK_SIZE, D)
    _quantize_store(k, kc_ptr, ks_ptr, dst, sdst, h, mask, hmask, FMT, SCALE_STRIDE_H)
    _quantize_store(v, vc_ptr, vs_ptr, dst, sdst, h, mask, hmask, FMT, SCALE_STRIDE_H)


def cache_format(cache: torch.Tensor) -> int:
    """FMT_FLOAT, FMT_INT8 or FMT_FP8 from the cache dtype (a ValueError for anything else)."""
    if cache.dtype in FLOAT_DTYPES:
        return FMT_FLOAT
    if cache.dtype == torch.int8:
        return FMT_INT8
    if cache.dtype == torch.float8_e4m3fn:
        return FMT_FP8
    if cache.dtype == torch.uint8:
        return FMT_INT4
    raise ValueError(f"k_cache dtype {cache.dtype} is not a supported cache format "
                     "(float32/float16/bfloat16, int8, float8_e4m3fn, uint8 = packed int4 or int2)")


def check_scales(fmt: int, k_cache, k_scale, v_scale) -> int:
    """Validate the scale tensors for a cache format; returns the per-head stride for fp8 (0 or 1)."""
    NB, BS, H, _ = k_cache.shape
    if fmt == FMT_INT4:
        raise ValueError("an int4 or int2 (uint8) cache is checked by "
                         "reshape_and_cache_int4.check_int4_cache")
    if fmt == FMT_FLOAT:
        if k_scale is not None or v_scale is not None:
            raise ValueError("k_scale/v_scale are only for int8 and fp8 caches")
        return 0
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            raise ValueError(f"{name} is required for a {k_cache.dtype} cache")
        want = torch.float16 if fmt == FMT_INT8 else torch.float32
        check_tensor(name, s, dtypes=(want,), device=k_cache.device)
        if fmt == FMT_INT8 and tuple(s.shape) != (NB, BS, H):
            raise ValueError(f"{name} must have shape {(NB, BS, H)} (per token, per KV head), "
                             f"got {tuple(s.shape)}")
        if fmt == FMT_FP8 and tuple(s.shape) not in ((), (H,)):
            raise ValueError(f"{name} must be a scalar or have shape ({H},), got {tuple(s.shape)}")
    if fmt == FMT_FP8 and k_scale.shape != v_scale.shape:
        raise ValueError("k_scale and v_scale must have the same shape")
    return 1 if (fmt == FMT_FP8 and k_scale.dim() == 1) else 0


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None, *,
                      sink_k: torch.Tensor | None = None, sink_v: torch.Tensor | None = None,
                      sink_slot: torch.Tensor | None = None, k_zero: torch.Tensor | None = None,
                      v_zero: torch.Tensor | None = None, k_res: torch.Tensor | None = None,
                      v_res: torch.Tensor | None = None, res_slot: torch.Tensor | None = None,
                      check_slots: bool = True) -> None:
    """Write k, v [N, Hkv, D] into slots `slot_mapping` [N] (int64) of [NB, BS, Hkv, D] caches.

    For an int8 cache, k_scale/v_scale [NB, BS, Hkv] float16 are written too; for fp8 they are
    read (per tensor [] or per KV head [Hkv]). A uint8 cache is packed int4 or int2 and needs the keyword
    arguments k_zero, v_zero, k_res, v_res, res_slot and takes `check_slots` (reshape_and_cache_int4);
    for the other formats they must stay None (check_slots is ignored).

    Attention sinks (every format; all three or none): the sink pool sink_k, sink_v [R, Hkv, D]
    in k's dtype and sink_slot int32 [NB], the pool row of block b's offset-0 token or -1. A
    token written at offset 0 of a block with a row is also stored there, unquantized; its
    quantized store is unchanged. Rows must lie in [0, R): they are not checked on the host.
    """
    if isinstance(k_cache, torch.Tensor) and k_cache.dtype == torch.uint8:
        from kvlab.kernels.reshape_and_cache_int4 import reshape_and_cache_int4
        return reshape_and_cache_int4(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                                      k_zero=k_zero, v_zero=v_zero, k_res=k_res, v_res=v_res,
                                      res_slot=res_slot, sink_k=sink_k, sink_v=sink_v,
                                      sink_slot=sink_slot, check_slots=check_slots)
    given = [n for n, t in (("k_res", k_res), ("k_zero", k_zero), ("res_slot", res_slot),
                            ("v_res", v_res), ("v_zero", v_zero)) if t is not None]
    if given:
        raise ValueError(f"{', '.join(sorted(given))}: only for an int4 or int2 (uint8) cache, "
                         f"not {getattr(k_cache, 'dtype', type(k_cache).__name__)}")
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=3)
    N, H, D = k.shape
    check_head_dim(D)
    check_tensor("v", v, dtypes=(k.dtype,), shape=(N, H, D), device=k.device)
    check_tensor("k_cache", k_cache, ndim=4, device=k.device)
    NB, BS, _, _ = k_cache.shape
    check_tensor("k_cache", k_cache, shape=(NB, BS, H, D))
    check_tensor("v_cache", v_cache, dtypes=(k_cache.dtype,), shape=(NB, BS, H, D), device=k.device)
    check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), shape=(N,), device=k.device)
    fmt = cache_format(k_cache)
    per_head = check_scales(fmt, k_cache, k_scale, v_scale)
    sink = check_sink(sink_k, sink_v, sink_slot, H=H, D=D, NB=NB, dtype=k.dtype, device=k.device)
    if N == 0:
        return
    dummy = k_cache  # a pointer for the unused scale and sink arguments
    opt = [t if t is not None else dummy for t in (k_scale, v_scale)]
    sinks = (sink_k, sink_v, sink_slot) if sink else (dummy,) * 3
    _reshape_and_cache_kernel[(N,)](
        k, v, k_cache, v_cache, *opt, slot_mapping, *sinks, H, k_cache.stride(0), k_cache.stride(1),
        BS * H, H, BLOCK_SIZE=BS, D=D, BLOCK_H=next_pow2(H), FMT=fmt, SCALE_STRIDE_H=per_head,
        SINK=sink)
