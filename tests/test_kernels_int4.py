"""int4 and int2 (KIVI) in the Triton kernels: the cache write (reshape_and_cache_int4) against
kvlab.quant.int4 bit for bit, and the fused-dequantization decode (v3) against float64 attention
over the cache kvlab.quant dequantizes, residual window included; prefill through
kvlab.attention.paged_triton; and kvlab.cache.quantized's int4 cache on the triton backend (the fused
kernels) against the same cache on the torch backend. int2 is the same kernels with 2-bit codes
(four per byte): each test that has a `bits` parameter runs both.
(tests/test_kernels_quant_engine.py does the same for int8 and fp8, and checks every stored byte.)

Under TRITON_INTERPRET=1 (CI) they run on the CPU with fp32/fp16 operands; with --gpu on CUDA.
Outputs (and unused cache entries) are poisoned with NaN before each launch.
"""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is Linux-only; the kernels cannot run here")
from helpers import DEVICE, gather, random_paged, reference_decode, rel_err, scale_for

from kvlab.attention import paged_triton
from kvlab.cache.base import causal_attention
from kvlab.cache.paged import AttentionMetadata
from kvlab.cache.quantized import QuantizedPagedKVCache
from kvlab.kernels.decode_attention_v3 import paged_decode_attention_v3
from kvlab.kernels.reshape_and_cache import reshape_and_cache
from kvlab.kernels.reshape_and_cache_int4 import reshape_and_cache_int4, sealed_blocks
from kvlab.quant import int4

BS = 16
LENS = [1, BS - 1, BS, 300]


def int4_cache(lens, Hkv, D, bs=BS, dtype=torch.float32, seed=0, sealed_this_step=(), bits=4):
    """A random paged cache quantized by kvlab.quant.int4, with each sequence's partial last block
    (and the last block of the sequences in `sealed_this_step`) in a full-precision residual pool,
    as kvlab.cache.quantized holds it during a step's attention. Returns the kernel's arguments and the
    float cache kvlab.quant reads (dequantized blocks, residual blocks in full precision)."""
    k, v, bt, ctx = random_paged(lens, Hkv, D, bs, seed=seed)
    g = torch.Generator().manual_seed(seed)                      # outlier channels, offsets
    k = k * (torch.rand(D, generator=g) * 3).to(DEVICE) + torch.randn(D, generator=g).to(DEVICE)
    kc, ks, kz = int4.quantize_keys(k, bits)
    vc, vs, vz = int4.quantize_values(v, bits=bits)
    kd, vd = (int4.dequantize_keys(kc, ks, kz, dtype, bits),
              int4.dequantize_values(vc, vs, vz, dtype, bits))
    NB = k.shape[0]
    res_slot = torch.full((NB,), -1, dtype=torch.int32, device=DEVICE)
    res_blocks = [int(bt[s, (n - 1) // bs]) for s, n in enumerate(lens)
                  if n % bs or s in sealed_this_step]
    R = len(res_blocks) + 1                                        # one spare row
    k_res = torch.full((R, bs, Hkv, D), float("nan"), device=DEVICE, dtype=dtype)
    v_res = k_res.clone()
    for r, b in enumerate(res_blocks):
        n = next(n for s, n in enumerate(lens) if int(bt[s, (n - 1) // bs]) == b)
        used = (n - 1) % bs + 1                                    # slots written so far
        res_slot[b] = r
        k_res[r, :used], v_res[r, :used] = k[b, :used].to(dtype), v[b, :used].to(dtype)
        kd[b], vd[b] = k[b].to(dtype), v[b].to(dtype)
        ks[b], kz[b], vs[b], vz[b] = (float("nan"),) * 4            # must not be read
    args = dict(k_scale=ks, v_scale=vs, k_zero=kz, v_zero=vz, k_res=k_res, v_res=v_res,
                res_slot=res_slot)
    return kc, vc, args, kd, vd, bt, ctx


def decode(q, kc, vc, bt, ctx, args, **kw):
    out = torch.full_like(q, float("nan"))
    return paged_decode_attention_v3(q, kc, vc, bt, ctx, scale_for(q.shape[-1]), out=out,
                                     **args, **kw)


# ---- the cache write ------------------------------------------------------------------------
def empty_int4(NB, bs, Hkv, D, R, dtype=torch.float32, bits=4):
    """An int4 (int2) cache and residual pool filled with NaN / 0xFF poison; res_slot all -1."""
    f16 = dict(device=DEVICE, dtype=torch.float16)
    NG = D // int4.value_group(D)
    kc = torch.full((NB, bs, Hkv, D * bits // 8), 0xFF, device=DEVICE, dtype=torch.uint8)
    args = dict(k_scale=torch.full((NB, Hkv, D), float("nan"), **f16),
                v_scale=torch.full((NB, bs, Hkv, NG), float("nan"), **f16),
                k_res=torch.full((R, bs, Hkv, D), float("nan"), device=DEVICE, dtype=dtype),
                res_slot=torch.full((NB,), -1, dtype=torch.int32, device=DEVICE))
    args["k_zero"], args["v_zero"] = args["k_scale"].clone(), args["v_scale"].clone()
    args["v_res"] = args["k_res"].clone()
    return kc, kc.clone(), args


def hard_tokens(N, Hkv, D, seed):
    """Keys with outlier channels, a constant channel (scale at its floor), values near zero
    (float16 subnormal zero points), negative-only and large channels; values per token."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(N, Hkv, D, generator=g) * (torch.rand(D, generator=g) * 4) ** 2
    k[:, :, 1] = 0.75                                              # max == min
    k[:, :, 2] = torch.rand(N, Hkv, generator=g) * 1e-6            # subnormal in float16
    k[:, :, 3] = -torch.rand(N, Hkv, generator=g) * 3 - 1          # one sign only
    k[:, :, 4] = torch.randn(N, Hkv, generator=g) * 1e4            # near float16's limit
    v = torch.randn(N, Hkv, D, generator=g) * torch.rand(N, Hkv, 1, generator=g) * 3
    v[0] = 0.0                                                     # an all-zero token
    return k.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("D,bs,Hkv,dtype,bits", [(64, 16, 2, torch.float32, 4),
                                                 (128, 8, 3, torch.float32, 4),
                                                 (16, 4, 1, torch.float32, 4),
                                                 (64, 16, 2, torch.float16, 4),
                                                 (64, 16, 2, torch.float32, 2),
                                                 (16, 4, 1, torch.float32, 2),
                                                 (128, 8, 3, torch.float16, 2)])
def test_write_bit_identical(D, bs, Hkv, dtype, bits):
    """Three blocks filled by one packed write (as a prefill does), one left partial: the filled
    blocks hold exactly kvlab.quant.int4's bytes, scales and zeros; the partial one is untouched
    in the quantized cache and sits, in full precision, in its residual row."""
    NB, blocks = 6, [4, 0, 2, 5]
    N = 3 * bs + bs // 2
    k, v = hard_tokens(N, Hkv, D, seed=D + bs)
    k, v = k.to(dtype), v.to(dtype)
    slots = torch.cat([torch.arange(bs) + b * bs for b in blocks])[:N].to(DEVICE)
    slots = torch.cat([slots, torch.tensor([-1], device=DEVICE)])  # padding: never written
    k = torch.cat([k, torch.full_like(k[:1], float("nan"))])
    v = torch.cat([v, torch.full_like(v[:1], float("nan"))])
    kc, vc, a = empty_int4(NB, bs, Hkv, D, R=5, dtype=dtype, bits=bits)
    for r, b in enumerate(blocks):
        a["res_slot"][b] = r
    reshape_and_cache(k, v, kc, vc, slots, **a)                    # dispatches on the uint8 cache
    assert sealed_blocks(slots, bs).tolist() == blocks[:3]
    for i, b in enumerate(blocks[:3]):
        kb, vb = k[i * bs:(i + 1) * bs], v[i * bs:(i + 1) * bs]
        for got, want in zip((kc[b], a["k_scale"][b], a["k_zero"][b]), int4.quantize_keys(kb, bits)):
            assert torch.equal(got, want)
        for got, want in zip((vc[b], a["v_scale"][b], a["v_zero"][b]),
                             int4.quantize_values(vb, bits=bits)):
            assert torch.equal(got, want)
        assert torch.equal(a["k_res"][i], kb) and torch.equal(a["v_res"][i], vb)
    half = bs // 2                                                 # the partial block 5
    assert torch.equal(a["k_res"][3, :half], k[3 * bs:N]) and torch.isnan(a["k_res"][3, half:]).all()
    assert torch.equal(a["v_res"][3, :half], v[3 * bs:N])
    assert (kc[[1, 3, 5]] == 0xFF).all() and torch.isnan(a["k_scale"][[1, 3, 5]]).all()
    assert torch.isnan(a["k_res"][4]).all()                        # the spare row


@pytest.mark.parametrize("bits", [4, 2])
def test_write_token_by_token_equals_one_write(bits):
    """A block filled one decode step at a time is quantized to the same bytes as in one write."""
    bs, Hkv, D = 4, 2, 32
    k, v = hard_tokens(bs, Hkv, D, seed=1)
    kc, vc, a = empty_int4(3, bs, Hkv, D, R=1, bits=bits)
    a["res_slot"][1] = 0
    for t in range(bs):
        s = torch.tensor([bs + t], device=DEVICE)
        reshape_and_cache_int4(k[t:t + 1], v[t:t + 1], kc, vc, s, **a)
        assert sealed_blocks(s, bs).numel() == (t == bs - 1)
        assert torch.isnan(a["k_scale"][1]).all() == (t < bs - 1)
    assert torch.equal(kc[1], int4.quantize_keys(k, bits)[0])
    assert torch.equal(vc[1], int4.quantize_values(v, bits=bits)[0])


def test_write_rejects_bad_inputs():
    bs, Hkv, D = 4, 2, 32
    k, v = hard_tokens(3, Hkv, D, seed=2)
    kc, vc, a = empty_int4(3, bs, Hkv, D, R=1)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="residual row"):          # res_slot[0] is -1
        reshape_and_cache_int4(k, v, kc, vc, slots, **a)
    reshape_and_cache_int4(k, v, kc, vc, slots, **a, check_slots=False)   # unchecked: no write
    assert torch.isnan(a["k_res"]).all() and (kc == 0xFF).all()
    a["res_slot"][0] = 0
    with pytest.raises(ValueError, match="k_zero is required"):
        reshape_and_cache(k, v, kc, vc, slots, **{**a, "k_zero": None})
    with pytest.raises(TypeError, match="k_scale must have dtype"):
        reshape_and_cache(k, v, kc, vc, slots, **{**a, "k_scale": a["k_scale"].float()})
    with pytest.raises(ValueError, match="v_scale has shape"):
        reshape_and_cache(k, v, kc, vc, slots, **{**a, "v_scale": a["v_scale"][..., :0]})
    with pytest.raises(ValueError, match="head dim / 2"):
        reshape_and_cache(k[..., :16].contiguous(), v[..., :16].contiguous(), kc, vc, slots, **a)
    with pytest.raises(TypeError, match="k_res must have dtype"):      # residual in k's dtype
        reshape_and_cache(k.half(), v.half(), kc, vc, slots, **a)
    with pytest.raises(ValueError, match="k_res"):
        reshape_and_cache(k, v, kc, vc, slots, **{**a, "k_res": a["k_res"][:0], "v_res": a["v_res"][:0]})
    with pytest.raises(ValueError, match="slot"):
        reshape_and_cache(k, v, kc, vc, torch.tensor([0, 1, 99], device=DEVICE), **a)
    with pytest.raises(ValueError, match="only for an int4"):
        fc = torch.zeros(3, bs, Hkv, D, device=DEVICE)
        reshape_and_cache(k, v, fc, fc.clone(), slots, res_slot=a["res_slot"])


# ---- fused dequantization in decode ---------------------------------------------------------
@pytest.mark.parametrize("group,D,bits", [(1, 64, 4), (3, 128, 4), (4, 64, 4), (3, 64, 4),
                                          (1, 128, 4), (3, 64, 2), (4, 128, 2), (1, 16, 2)])
def test_decode_matches_reference(group, D, bits):
    """Lengths 1, BS - 1, BS and 300 in one batch; the full last block of the third sequence was
    sealed this step (read from its residual row); the quantized data of residual blocks is NaN."""
    kc, vc, args, kd, vd, bt, ctx = int4_cache(LENS, 2, D, seed=D + group, sealed_this_step=(2,),
                                               bits=bits)
    q = torch.randn(len(LENS), 2 * group, D, device=DEVICE)
    ref = reference_decode(q, kd, vd, bt, ctx)
    assert rel_err(decode(q, kc, vc, bt, ctx, args), ref) < 1e-5
    if group == 3:                                                 # several partitions + reduce
        assert rel_err(decode(q, kc, vc, bt, ctx, args, partition_size=64), ref) < 1e-5


def test_decode_fp16_and_odd_block_size():
    """fp16 queries and residual pool; a block size of 12 (tiles straddle blocks)."""
    lens = [5, 12, 40, 130]
    kc, vc, args, kd, vd, bt, ctx = int4_cache(lens, 2, 64, bs=12, dtype=torch.float16, seed=4)
    q = torch.randn(len(lens), 8, 64, device=DEVICE).half()
    out = decode(q, kc, vc, bt, ctx, args, partition_size=64)
    assert out.dtype == torch.float16
    assert rel_err(out, reference_decode(q, kd, vd, bt, ctx)) < 5e-3


@pytest.mark.parametrize("bits", [4, 2])
def test_decode_bf16_query(bits):
    """bf16 queries and residual pool: the dots run in fp16 (see decode_attention_v3)."""
    lens = [3, 70]
    kc, vc, args, kd, vd, bt, ctx = int4_cache(lens, 2, 64, dtype=torch.bfloat16, seed=9, bits=bits)
    q = torch.randn(len(lens), 8, 64, device=DEVICE).bfloat16()
    out = decode(q, kc, vc, bt, ctx, args)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference_decode(q, kd, vd, bt, ctx)) < 1e-2


@pytest.mark.parametrize("bits", [4, 2])
def test_prefill_over_cached_int4_prefix(bits):
    """paged_triton.paged_prefill_attention on an int4 cache: chunks whose prefix is in sealed
    blocks and whose own tokens are in the residual pool (a decode, a full prompt, a chunk after
    a cached prefix), against causal attention over the cache kvlab.quant reads."""
    lens, q_lens = [40, 1, 12, 35], [8, 1, 12, 3]
    kc, vc, args, kd, vd, bt, ctx = int4_cache(lens, 2, 64, seed=11, bits=bits)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(q_lens), 6, 64, device=DEVICE)
    out = paged_triton.paged_prefill_attention(q, kc, vc, bt, qsl, ctx, scale_for(64), **args)
    ref = [causal_attention(q[qsl[s]:qsl[s + 1]].double()[None], gather(kd, bt[s], n).double()[None],
                            gather(vd, bt[s], n).double()[None], q_offset=n - ql)[0]
           for s, (n, ql) in enumerate(zip(lens, q_lens))]
    assert rel_err(out, torch.cat(ref)) < 1e-5


def test_decode_rejects_bad_inputs():
    kc, vc, args, kd, vd, bt, ctx = int4_cache([5, 20], 2, 64, seed=5)
    q = torch.randn(2, 4, 64, device=DEVICE)
    s = scale_for(64)
    with pytest.raises(ValueError, match="res_slot is required"):
        paged_decode_attention_v3(q, kc, vc, bt, ctx, s, **{**args, "res_slot": None})
    with pytest.raises(ValueError, match="head dim / 2"):
        paged_decode_attention_v3(torch.randn(2, 4, 32, device=DEVICE), kc, vc, bt, ctx, s, **args)
    with pytest.raises(ValueError, match="head dim / 4 = 16, got 8"):    # neither 4 nor 2 bits
        paged_decode_attention_v3(q, kc[..., :8].contiguous(), vc[..., :8].contiguous(), bt, ctx,
                                  s, **args)
    with pytest.raises(TypeError, match="k_res must have dtype"):    # the pool is in q's dtype
        paged_decode_attention_v3(q.half(), kc, vc, bt, ctx, s, **args)
    with pytest.raises(ValueError, match="k_zero has shape"):
        paged_decode_attention_v3(q, kc, vc, bt, ctx, s, **{**args, "k_zero": args["k_zero"][:1]})
    with pytest.raises(TypeError, match="res_slot must have dtype"):
        paged_decode_attention_v3(q, kc, vc, bt, ctx, s, **{**args, "res_slot": args["res_slot"].long()})
    with pytest.raises(ValueError, match="only for an int4"):
        paged_decode_attention_v3(q, kd, vd, bt, ctx, s, res_slot=args["res_slot"])


# ---- the engine's int4 step: kvlab.cache.quantized on the triton backend -----------------------
@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_engine_steps_equal_quantized_paged_cache(fmt):
    """A packed prefill (prompts of 6 and 3 tokens, a block filled inside it) then 6 decode steps,
    blocks of 4, a residual pool of 2 rows that must grow: every step's attention output on the
    triton backend (fused kernels) matches the torch backend, and the quantized blocks hold the
    same bytes, scales and zeros."""
    NB, bs, Hkv, group, D = 10, 4, 2, 3, 32
    ref, fused = (QuantizedPagedKVCache(1, NB, bs, Hkv, D, kv_cache_dtype=fmt, device=DEVICE,
                                        attention_backend=b) for b in ("torch", "triton"))
    for c in (ref, fused):                        # start small so that the pool has to grow
        c.residual = paged_triton.Int4Residual.create(1, NB, bs, Hkv, D, c.dtype, DEVICE, rows=2)
    tables = torch.tensor([[3, 7, 1, -1], [5, 0, 9, -1]], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    lens, peak = [6, 3], 0
    for step in range(7):
        new = lens if step == 0 else [1, 1]
        end = [n if step == 0 else n + step for n in lens]
        pos = [(s, t) for s, (e, n) in enumerate(zip(end, new)) for t in range(e - n, e)]
        slots = torch.tensor([int(tables[s, t // bs]) * bs + t % bs for s, t in pos], device=DEVICE)
        m = AttentionMetadata(slot_mapping=slots,
                              query_start_loc=torch.tensor([0, new[0], sum(new)], dtype=torch.int32,
                                                           device=DEVICE),
                              context_lens=torch.tensor(end, dtype=torch.int32, device=DEVICE),
                              block_tables=tables, is_decode=step > 0)
        N = len(pos)
        q = torch.randn(1, N, Hkv * group, D, generator=g).to(DEVICE)
        k = (torch.randn(1, N, Hkv, D, generator=g) * torch.linspace(0.2, 3, D)).to(DEVICE)
        v = torch.randn(1, N, Hkv, D, generator=g).to(DEVICE)
        outs = []
        for cache in (ref, fused):
            cache.set_metadata(m)
            outs.append(cache.attend(0, q, k, v))
            peak = max(peak, fused.residual.k_res[0].shape[0])
            cache.end_step()                      # the sealed blocks' rows close
        assert rel_err(outs[1], outs[0].double()) < 1e-5, step
        partial = sum(e % bs != 0 for e in end)   # one row per sequence with a partial block
        assert fused.residual.rows_in_use == ref.num_residual_blocks == partial, step
    assert peak > 2 == fused.residual.k_res[0].shape[0]  # grew during the prefill, then shrank back
    sealed = [3, 7, 1, 5, 0]                      # 12 and 9 tokens: 3 + 2 full blocks (1: last step)
    assert fused.residual.res_slot[sealed].eq(-1).all() and int(fused.residual.res_slot[9]) >= 0
    for name in ("k_cache", "v_cache", "k_scale", "k_zero", "v_scale", "v_zero"):
        assert torch.equal(getattr(fused, name)[0][sealed], getattr(ref, name)[0][sealed]), name
