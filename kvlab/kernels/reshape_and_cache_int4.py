"""The int4 and int2 (KIVI) cache write: rows into the residual window, complete blocks quantized in place.

int4 keys are quantized *per channel over a group of block_size tokens* (kvlab.quant.int4; Liu et
al., 2024, "KIVI"), so a key cannot be quantized on its own: its scale depends on tokens that do
not exist yet. A sequence's last, partial block stays in full precision (the residual window) and
a block is quantized once, when its last slot is written; that step's attention still reads it in
full precision. The storage (kvlab.quant.residual, shared with kvlab.cache.quantized's PyTorch path):

    residual pool   k_res, v_res [R, BS, Hkv, D] in the model dtype (rows handed out by the caller)
    res_slot        int32 [NB]: the residual row of block b, or -1 once b is quantized ("sealed")

Launch 1, one program per new token: copy k[n], v[n] into row res_slot[slot // BS], offset
slot % BS. Launch 2, one program per (new token, KV head), that only works when the token took the
last slot of its block: read the block's BS full-precision rows back and write

    keys    per channel over the BS tokens: zero = min rounded down to float16, scale =
            max((max - zero) / 15, float16 tiny) rounded up to float16 -> k_scale, k_zero [NB, Hkv, D]
    values  per token, per group of 32 channels (the whole head if D < 32), same rule
            -> v_scale, v_zero [NB, BS, Hkv, D / 32]
    codes   q = round((x - zero) / scale) clamped to 0..15, two per byte, low nibble = even
            channel -> k_cache, v_cache uint8 [NB, BS, Hkv, D / 2]

Attention sinks (optional; the pool is described in reshape_and_cache): launch 1 also copies a
token written at offset 0 of a block with a sink row (sink_slot[block] >= 0) into that row, and
launch 2 takes such a block's key min and max over its tokens 1 .. BS-1 only, so that a sink key
far from the others does not widen every channel's step. Token 0's codes are still computed with
those scales, clamped to the code range, and never read: decode reads the sink row instead. This
is kvlab.quant.int4.quantize_keys(block, bits, skip_first=True); values are per token and do not
change. A sink needs BS >= 2.

int2 is the same kernel with BITS = 2 (kvlab.quant.int4 with bits=2): scale = (max - zero) / 3,
codes 0..3, four per byte, channel 4j + i in bits 2i and 2i + 1 -> uint8 [NB, BS, Hkv, D / 4].
Which one a cache holds is read from its shape: the last dimension is D * BITS / 8 (`packed_bits`).

The launches are ordered on the stream, so launch 2 sees every row launch 1 wrote, including the
other tokens of a block filled by one prefill. Quantizing before this step's attention changes
nothing it sees: a block whose res_slot is still >= 0 is read from the residual pool by the decode
kernel (decode_attention_v3), exactly as the PyTorch path reads its residual rows. The caller
sets res_slot[b] = -1 for the sealed blocks after the step's attention, and frees their rows;
`sealed_blocks` lists them.

Bit-identical to kvlab.quant.int4: every step is the same float32 operation in the same order,
divisions are IEEE round-to-nearest (tl.math.div_rn, not the GPU's approximate divide), float16
conversions round to nearest even and are then nudged up or down by one ulp as
round_up_fp16 / round_down_fp16 do, and round() is half-to-even (the 1.5 * 2**23 trick, see
reshape_and_cache). Unlike the PyTorch quantizer the kernel does not check its input for inf, nan
or magnitudes past float16's range (that would need a device-to-host sync): keys and values must
be finite and below 65504 in magnitude.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels._checks import FLOAT_DTYPES, check_head_dim, check_sink, check_tensor, next_pow2
from kvlab.kernels.reshape_and_cache import _rint, _store_sink
from kvlab.quant.residual import sealed_blocks  # noqa: F401  (the blocks a write seals; re-exported)

VALUE_GROUP = 32                       # as kvlab.quant.int4.VALUE_GROUP


def value_group(D: int) -> int:
    """Channels per value scale: 32, or the whole head when it is narrower (kvlab.quant.int4)."""
    return min(VALUE_GROUP, D)


def packed_bits(k_cache: torch.Tensor, D: int) -> int:
    """Bits per code of a packed uint8 cache [NB, BS, Hkv, D * bits / 8] for head dim D: 4 or 2."""
    last = k_cache.shape[-1] if k_cache.dim() == 4 else -1
    if last * 2 == D:
        return 4
    if last * 4 == D:
        return 2
    raise ValueError(f"a packed k_cache holds two channels per byte (int4) or four (int2): its last "
                     f"dimension must be head dim / 2 = {D // 2} or head dim / 4 = {D // 4}, got "
                     f"shape {tuple(k_cache.shape)}")


@triton.jit
def _f16_up(s):
    """float32 s > 0 -> float16, rounded towards +inf (kvlab.quant.common.round_up_fp16)."""
    s16 = s.to(tl.float16)
    up = (s16.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
    return tl.where(s16.to(tl.float32) < s, up, s16)


@triton.jit
def _f16_down(z):
    """float32 z -> float16, rounded towards -inf (kvlab.quant.common.round_down_fp16). The next
    float16 below: bits - 1 for a positive number, bits + 1 for a negative one or -0, and the
    smallest negative subnormal (0x8001) below +0."""
    z16 = z.to(tl.float16)
    b = z16.to(tl.int16, bitcast=True)
    below = tl.where(b > 0, b - 1, tl.where(b == 0, -32767, b + 1)).to(tl.int16)
    return tl.where(z16.to(tl.float32) > z, below.to(tl.float16, bitcast=True), z16)


@triton.jit
def _params(mn, mx, LEVELS: tl.constexpr):
    """(zero, scale) float16 of a group with minimum mn and maximum mx (float32); LEVELS = 2**bits - 1."""
    zero = _f16_down(mn)
    scale = _f16_up(tl.maximum(tl.math.div_rn(mx - zero.to(tl.float32), LEVELS * 1.0),
                               6.103515625e-05))
    return zero, scale


@triton.jit
def _codes(x, zero, scale, LEVELS: tl.constexpr):
    q = _rint(tl.math.div_rn(x - zero.to(tl.float32), scale.to(tl.float32)))
    return tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0).to(tl.int32)


@triton.jit
def _residual_write_kernel(k_ptr, v_ptr, kr_ptr, vr_ptr, rslot_ptr, slot_ptr, sk_ptr, sv_ptr,
                           ss_ptr, H, BLOCK_SIZE: tl.constexpr, D: tl.constexpr,
                           BLOCK_H: tl.constexpr, SINK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + n)
    blk = tl.maximum(slot, 0) // BLOCK_SIZE
    row = tl.load(rslot_ptr + blk).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D)[None, :]
    mask = (h < H) & (d < D) & ((h * 0 + slot) >= 0) & ((h * 0 + row) >= 0)
    src = n * H * D + h * D + d
    dst = ((row * BLOCK_SIZE + tl.maximum(slot, 0) % BLOCK_SIZE) * H + h) * D + d
    k = tl.load(k_ptr + src, mask=mask, other=0.0)
    v = tl.load(v_ptr + src, mask=mask, other=0.0)
    tl.store(kr_ptr + dst, k.to(kr_ptr.dtype.element_ty), mask=mask)
    tl.store(vr_ptr + dst, v.to(vr_ptr.dtype.element_ty), mask=mask)
    if SINK:
        _store_sink(k, v, sk_ptr, sv_ptr, ss_ptr, slot, h, d, mask, H, BLOCK_SIZE, D)


@triton.jit
def _seal_kernel(kr_ptr, vr_ptr, rslot_ptr, slot_ptr, kc_ptr, vc_ptr, ks_ptr, kz_ptr,
                 vs_ptr, vz_ptr, ss_ptr, H, BLOCK_SIZE: tl.constexpr, D: tl.constexpr,
                 BLOCK_T: tl.constexpr, VG: tl.constexpr, BITS: tl.constexpr,
                 SINK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    PER: tl.constexpr = 8 // BITS                                # codes per byte
    LEVELS: tl.constexpr = (1 << BITS) - 1
    slot = tl.load(slot_ptr + n)
    blk = tl.maximum(slot, 0) // BLOCK_SIZE
    row = tl.load(rslot_ptr + blk).to(tl.int64)
    if (slot >= 0) & (slot % BLOCK_SIZE == BLOCK_SIZE - 1) & (row >= 0):   # completed its block
        t = tl.arange(0, BLOCK_T)[:, None]                       # token of the block
        e = tl.arange(0, D // PER)[None, :]                      # byte e holds channels PER*e + i
        tmask = (t < BLOCK_SIZE) & (e < D // PER)
        src = ((row * BLOCK_SIZE + t) * H + h) * D + PER * e     # channel PER*e of each token
        dst = ((blk * BLOCK_SIZE + t) * H + h) * (D // PER) + e  # codes [NB, BS, H, D/PER]

        # keys: per channel, min and max over the block's tokens (but a sink: its token 0 is
        # read from the sink pool, and its codes are clamped); code i of a byte in bits i*BITS
        stats = tmask
        if SINK:
            stats = tmask & ((t > 0) | (tl.load(ss_ptr + blk) < 0))
        qk = tl.zeros([BLOCK_T, D // PER], tl.int32)
        for i in tl.static_range(PER):
            k = tl.load(kr_ptr + src + i, mask=tmask, other=0.0).to(tl.float32)
            z, sc = _params(tl.min(tl.where(stats, k, float("inf")), axis=0),
                            tl.max(tl.where(stats, k, float("-inf")), axis=0), LEVELS)
            qk |= _codes(k, z[None, :], sc[None, :], LEVELS) << (i * BITS)
            c = (blk * H + h) * D + PER * tl.arange(0, D // PER) + i    # k_scale, k_zero [NB, H, D]
            tl.store(ks_ptr + c, sc)
            tl.store(kz_ptr + c, z)
        tl.store(kc_ptr + dst, qk.to(tl.uint8), mask=tmask)

        # values: per token, groups of VG consecutive channels; byte e lies in group PER*e // VG
        gid = (PER * e) // VG
        zf = tl.zeros([BLOCK_T, D // PER], tl.float16)
        sf = tl.zeros([BLOCK_T, D // PER], tl.float16)
        tt = tl.arange(0, BLOCK_T)
        for gi in tl.static_range(D // VG):
            ing = gid == gi
            mn = tl.full([BLOCK_T], float("inf"), tl.float32)
            mx = tl.full([BLOCK_T], float("-inf"), tl.float32)
            for i in tl.static_range(PER):
                v = tl.load(vr_ptr + src + i, mask=tmask, other=0.0).to(tl.float32)
                mn = tl.minimum(mn, tl.min(tl.where(ing, v, float("inf")), axis=1))
                mx = tl.maximum(mx, tl.max(tl.where(ing, v, float("-inf")), axis=1))
            zg, sg = _params(mn, mx, LEVELS)                      # [BLOCK_T]
            zf = tl.where(ing, zg[:, None], zf)
            sf = tl.where(ing, sg[:, None], sf)
            g_dst = ((blk * BLOCK_SIZE + tt) * H + h) * (D // VG) + gi   # [NB, BS, H, D/VG]
            tl.store(vs_ptr + g_dst, sg, mask=tt < BLOCK_SIZE)
            tl.store(vz_ptr + g_dst, zg, mask=tt < BLOCK_SIZE)
        qv = tl.zeros([BLOCK_T, D // PER], tl.int32)
        for i in tl.static_range(PER):
            v = tl.load(vr_ptr + src + i, mask=tmask, other=0.0).to(tl.float32)
            qv |= _codes(v, zf, sf, LEVELS) << (i * BITS)
        tl.store(vc_ptr + dst, qv.to(tl.uint8), mask=tmask)


def check_int4_cache(k_cache, v_cache, k_scale, v_scale, k_zero, v_zero, k_res, v_res, res_slot,
                     D: int, model_dtype=None) -> tuple[int, int, int, int]:
    """Shapes and dtypes of an int4 or int2 cache (docs/architecture.md section 4) and its
    residual pool; returns (NB, BS, Hkv, bits)."""
    check_tensor("k_cache", k_cache, dtypes=(torch.uint8,), ndim=4)
    NB, BS, H, packed = k_cache.shape
    bits = packed_bits(k_cache, D)
    dev = k_cache.device
    check_tensor("v_cache", v_cache, dtypes=(torch.uint8,), shape=(NB, BS, H, packed), device=dev)
    NG = D // value_group(D)
    for name, t in (("k_scale", k_scale), ("k_zero", k_zero), ("v_scale", v_scale),
                    ("v_zero", v_zero), ("k_res", k_res), ("v_res", v_res),
                    ("res_slot", res_slot)):
        if t is None:
            raise ValueError(f"{name} is required for an int4 or int2 (uint8) cache")
    for name, t in (("k_scale", k_scale), ("k_zero", k_zero)):
        check_tensor(name, t, dtypes=(torch.float16,), ndim=3, shape=(NB, H, D), device=dev)
    for name, t in (("v_scale", v_scale), ("v_zero", v_zero)):
        check_tensor(name, t, dtypes=(torch.float16,), ndim=4, shape=(NB, BS, H, NG), device=dev)
    check_tensor("k_res", k_res, dtypes=FLOAT_DTYPES if model_dtype is None else (model_dtype,),
                 ndim=4, device=dev)
    if k_res.shape[0] < 1 or tuple(k_res.shape[1:]) != (BS, H, D):
        raise ValueError(f"k_res (the residual pool) must have shape [R >= 1, {BS}, {H}, {D}], "
                         f"got {tuple(k_res.shape)}")
    check_tensor("v_res", v_res, dtypes=(k_res.dtype,), shape=tuple(k_res.shape), device=dev)
    check_tensor("res_slot", res_slot, dtypes=(torch.int32,), ndim=1, shape=(NB,), device=dev)
    return NB, BS, H, bits


def reshape_and_cache_int4(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, *, k_zero,
                           v_zero, k_res, v_res, res_slot, sink_k=None, sink_v=None,
                           sink_slot=None, check_slots: bool = True) -> None:
    """Write k, v [N, Hkv, D] into the residual rows of their slots, then quantize every block
    whose last slot is among `slot_mapping` (see the module docstring for the layout). int4 or
    int2 by the cache's last dimension, D / 2 or D / 4. sink_k, sink_v [R, Hkv, D] (k's dtype)
    and sink_slot int32 [NB]: the attention-sink pool, all three or none (module docstring).

    Every block written must have a residual row (res_slot[slot // BS] in [0, R)) and every slot
    must exist, and every sink row written must lie in [0, sink_k.shape[0]): a ValueError
    otherwise. That check reads slot_mapping, res_slot and sink_slot on the host (a device sync);
    `check_slots=False` skips it, and then a token whose block has no row is silently not written."""
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=3)
    N, H, D = k.shape
    check_head_dim(D)
    check_tensor("v", v, dtypes=(k.dtype,), shape=(N, H, D), device=k.device)
    NB, BS, Hc, bits = check_int4_cache(k_cache, v_cache, k_scale, v_scale, k_zero, v_zero, k_res, v_res,
                                  res_slot, D, model_dtype=k.dtype)
    if k_cache.device != k.device:
        raise ValueError(f"k_cache is on {k_cache.device}, expected {k.device}")
    if Hc != H:
        raise ValueError(f"k has {H} KV heads but k_cache has {Hc}")
    check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), shape=(N,), device=k.device)
    sink = check_sink(sink_k, sink_v, sink_slot, H=H, D=D, NB=NB, dtype=k.dtype, device=k.device)
    if sink and BS < 2:
        raise ValueError("sink_slot: a sink's block takes its key scales from its other tokens, "
                         f"so int{bits} sinks need a block size of at least 2, got {BS}")
    if N == 0:
        return
    used = slot_mapping[slot_mapping >= 0] if check_slots else slot_mapping[:0]
    if used.numel():
        if int(used.max()) >= NB * BS:
            raise ValueError(f"slot_mapping holds slot {int(used.max())}; the cache has "
                             f"{NB * BS} slots")
        rows = res_slot[used // BS]
        if bool((rows < 0).any()) or int(rows.max()) >= k_res.shape[0]:
            raise ValueError("every written block needs a residual row: res_slot[slot // "
                             f"block_size] must lie in [0, {k_res.shape[0]}) for each slot")
        firsts = used[used % BS == 0] // BS                      # blocks whose token 0 is written
        if sink and firsts.numel() and int(sink_slot[firsts].max()) >= sink_k.shape[0]:
            raise ValueError(f"sink_slot names a row past the sink pool ({sink_k.shape[0]} rows)")
    sinks = (sink_k, sink_v, sink_slot) if sink else (res_slot,) * 3   # dummies when off
    _residual_write_kernel[(N,)](k, v, k_res, v_res, res_slot, slot_mapping, *sinks, H,
                                 BLOCK_SIZE=BS, D=D, BLOCK_H=next_pow2(H), SINK=sink)
    _seal_kernel[(N, H)](k_res, v_res, res_slot, slot_mapping, k_cache, v_cache, k_scale, k_zero,
                         v_scale, v_zero, sinks[2], H, BLOCK_SIZE=BS, D=D, BLOCK_T=next_pow2(BS),
                         VG=value_group(D), BITS=bits, SINK=sink)
