"""Attention sinks in the Triton kernels: each sequence's token at position 0 kept in full precision
in a sink pool (sink_k, sink_v [R, Hkv, D], sink_slot int32 [NB]; kvlab/kernels/reshape_and_cache.py).

The write, every format: sink rows hold k and v exactly, the quantized bytes are those of
kvlab.quant (int4/int2: a sink's block takes its key scales from its other tokens,
int4.quantize_keys(..., skip_first=True)), rows not assigned stay poisoned. The decode (v3), every
format: float64 attention over the cache kvlab.quant dequantizes with each sink sequence's token 0
replaced by its sink row; the cache's own copy of token 0 is poisoned (NaN scales or codes) so
that reading it fails. Prefill through kvlab.attention.paged_triton; bad arguments.
"""
import pytest
import torch

pytest.importorskip("triton", reason="Triton is Linux-only; the kernels cannot run here")
from helpers import DEVICE, gather, random_paged, reference_decode, rel_err, scale_for

from kvlab.attention import paged_triton
from kvlab.cache.base import causal_attention
from kvlab.kernels.decode_attention_v3 import paged_decode_attention_v3
from kvlab.kernels.reshape_and_cache import reshape_and_cache
from kvlab.quant import int4
from kvlab.quant.fp8 import dequantize_fp8, quantize_fp8
from kvlab.quant.int8 import dequantize_int8, quantize_int8

BS, HKV, D = 8, 2, 64
FP8_SCALES = (torch.tensor([0.02, 0.05]), torch.tensor([0.03, 0.01]))   # per KV head (k, v)
NAN8 = 0x7F                                                             # a float8_e4m3fn NaN


def sink_pool(R, NB, dtype=torch.float32):
    """A sink pool poisoned with NaN and a sink_slot of -1 (no block has a row)."""
    sk = torch.full((R, HKV, D), float("nan"), device=DEVICE, dtype=dtype)
    return dict(sink_k=sk, sink_v=sk.clone(),
                sink_slot=torch.full((NB,), -1, dtype=torch.int32, device=DEVICE))


def empty_cache(fmt, NB, R_res=0, dtype=torch.float32, bs=BS):
    """(k_cache, v_cache, scale arguments) of one format, poisoned: NaN, 0xFF codes, NaN scales."""
    f16 = dict(device=DEVICE, dtype=torch.float16)
    if fmt == "auto":
        kc = torch.full((NB, bs, HKV, D), float("nan"), device=DEVICE, dtype=dtype)
        return kc, kc.clone(), {}
    if fmt == "int8":
        kc = torch.full((NB, bs, HKV, D), -1, device=DEVICE, dtype=torch.int8)
        s = torch.full((NB, bs, HKV), float("nan"), **f16)
        return kc, kc.clone(), dict(k_scale=s, v_scale=s.clone())
    if fmt == "fp8":
        kc = torch.full((NB, bs, HKV, D), NAN8, device=DEVICE, dtype=torch.uint8).view(torch.float8_e4m3fn)
        return kc, kc.clone(), dict(k_scale=FP8_SCALES[0].to(DEVICE), v_scale=FP8_SCALES[1].to(DEVICE))
    bits = int4.FORMAT_BITS[fmt]
    kc = torch.full((NB, bs, HKV, D * bits // 8), 0xFF, device=DEVICE, dtype=torch.uint8)
    NG = D // int4.value_group(D)
    a = dict(k_scale=torch.full((NB, HKV, D), float("nan"), **f16),
             v_scale=torch.full((NB, bs, HKV, NG), float("nan"), **f16),
             k_res=torch.full((R_res, bs, HKV, D), float("nan"), device=DEVICE, dtype=dtype),
             res_slot=torch.full((NB,), -1, dtype=torch.int32, device=DEVICE))
    a["k_zero"], a["v_zero"], a["v_res"] = a["k_scale"].clone(), a["v_scale"].clone(), a["k_res"].clone()
    return kc, kc.clone(), a


def sink_tokens(N, seed, firsts=()):
    """Keys with channel offsets and scales; the tokens at `firsts` are sinks: large, far keys."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(N, HKV, D, generator=g) * torch.rand(D, generator=g) * 2 + torch.randn(D, generator=g)
    v = torch.randn(N, HKV, D, generator=g)
    for i in firsts:
        k[i] = torch.randn(HKV, D, generator=g) * 6
    return k.to(DEVICE), v.to(DEVICE)


# ---- the cache write ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,dtype", [("auto", torch.float16), ("int8", torch.float32),
                                       ("int8", torch.bfloat16), ("fp8", torch.float32),
                                       ("int4", torch.float32), ("int4", torch.float16),
                                       ("int2", torch.float32)])
def test_write(fmt, dtype):
    """One packed write as a prefill makes it: sequence A fills block 4 (its first, sink row 1)
    and half of block 1; B fills block 2 (its first, sink row 0) and 3 tokens of block 0; C (a
    later chunk) fills block 5, whose first token has no sink row; one padding slot."""
    NB, sinks = 7, {4: 1, 2: 0}
    blocks = [(4, BS), (1, BS // 2), (2, BS), (0, 3), (5, BS)]
    slots = torch.cat([torch.arange(n) + b * BS for b, n in blocks] + [torch.tensor([-1])]).to(DEVICE)
    starts = torch.tensor([0] + [n for _, n in blocks]).cumsum(0).tolist()
    N = slots.numel()
    k, v = sink_tokens(N, seed=len(fmt) + N, firsts=[starts[0], starts[2], starts[4]])
    k, v = k.to(dtype), v.to(dtype)
    k[-1], v[-1] = float("nan"), float("nan")                       # the padding token
    kc, vc, a = empty_cache(fmt, NB, R_res=len(blocks) + 1, dtype=dtype)
    if "res_slot" in a:
        for r, (b, _) in enumerate(blocks):
            a["res_slot"][b] = r
    pool = sink_pool(3, NB, dtype)                                   # row 2: never assigned
    for b, r in sinks.items():
        pool["sink_slot"][b] = r
    reshape_and_cache(k, v, kc, vc, slots, **a, **pool)

    for b, r in sinks.items():                                       # the sink rows: k, v exactly
        i = starts[[b for b, _ in blocks].index(b)]
        assert torch.equal(pool["sink_k"][r], k[i]) and torch.equal(pool["sink_v"][r], v[i])
    assert torch.isnan(pool["sink_k"][2]).all() and torch.isnan(pool["sink_v"][2]).all()
    keep = slots >= 0
    kk, vv, written = k[keep], v[keep], slots[keep]
    if fmt == "auto":
        assert torch.equal(kc.view(-1, HKV, D)[written], kk)
        assert torch.equal(vc.view(-1, HKV, D)[written], vv)
    elif fmt == "int8":
        for x, c, s in ((kk, kc, a["k_scale"]), (vv, vc, a["v_scale"])):
            q_ref, s_ref = quantize_int8(x)
            assert torch.equal(c.view(-1, HKV, D)[written], q_ref)
            assert torch.equal(s.view(-1, HKV)[written], s_ref)
    elif fmt == "fp8":
        for x, c, s in ((kk, kc, a["k_scale"]), (vv, vc, a["v_scale"])):
            got = c.view(-1, HKV, D)[written].view(torch.uint8)
            assert torch.equal(got, quantize_fp8(x, s).view(torch.uint8))
    else:
        bits = int4.FORMAT_BITS[fmt]
        for j, (b, n) in enumerate(blocks):
            kb, vb = k[starts[j]:starts[j] + n], v[starts[j]:starts[j] + n]
            if n < BS:                                               # partial: residual row only
                assert (kc[b] == 0xFF).all() and torch.isnan(a["k_scale"][b]).all()
                assert torch.equal(a["k_res"][j, :n], kb)
                continue
            want = int4.quantize_keys(kb, bits, skip_first=b in sinks)
            for got, w in zip((kc[b], a["k_scale"][b], a["k_zero"][b]), want):
                assert torch.equal(got, w)
            if b in sinks:                                           # the sink changes the scales
                assert not torch.equal(want[1], int4.quantize_keys(kb, bits)[1])
            for got, w in zip((vc[b], a["v_scale"][b], a["v_zero"][b]), int4.quantize_values(vb, bits=bits)):
                assert torch.equal(got, w)


@pytest.mark.parametrize("bits", [4, 2])
def test_int4_sink_block_filled_token_by_token(bits):
    """A sink's block filled one decode step at a time is sealed as in one write."""
    bs = 4
    k, v = sink_tokens(bs, seed=3, firsts=[0])
    kc, vc, a = empty_cache(f"int{bits}", 3, R_res=1, bs=bs)
    a["res_slot"][1] = 0
    pool = sink_pool(1, 3)
    pool["sink_slot"][1] = 0
    for t in range(bs):
        reshape_and_cache(k[t:t + 1], v[t:t + 1], kc, vc, torch.tensor([bs + t], device=DEVICE),
                          **a, **pool)
    want = int4.quantize_keys(k, bits, skip_first=True)
    for got, w in zip((kc[1], a["k_scale"][1], a["k_zero"][1]), want):
        assert torch.equal(got, w)
    assert torch.equal(pool["sink_k"][0], k[0]) and torch.equal(pool["sink_v"][0], v[0])


# ---- decode: the sink row replaces token 0 --------------------------------------------------
LENS, NO_SINK = [1, 20, BS - 1, 150], 1          # sequence 1's first block has no sink row


def sink_cache(fmt, lens, dtype=torch.float32, seed=0):
    """A random paged cache in `fmt` as kvlab.quant writes it (int4/int2: each sequence's partial
    last block in the residual pool), a sink row for the first block of every sequence but
    NO_SINK, and the cache's copy of those sinks poisoned. Returns (k_cache, v_cache, kernel
    arguments, kd, vd, bt, ctx); kd, vd: the float cache that attention must see."""
    k, v, bt, ctx = random_paged(lens, HKV, D, BS, seed=seed)
    g = torch.Generator().manual_seed(seed)
    k = k * (torch.rand(D, generator=g) * 2).to(DEVICE) + torch.randn(D, generator=g).to(DEVICE)
    NB = k.shape[0]
    pool = sink_pool(len(lens) + 1, NB, dtype)                      # one spare row
    sinks = {int(bt[s, 0]): s for s in range(len(lens)) if s != NO_SINK}
    for b, r in sinks.items():
        pool["sink_slot"][b] = r
        pool["sink_k"][r] = (torch.randn(HKV, D, generator=g) * 6).to(DEVICE, dtype)
        pool["sink_v"][r] = torch.randn(HKV, D, generator=g).to(DEVICE, dtype)
    first = list(sinks)
    if fmt == "auto":
        kc, vc, a = k.to(dtype), v.to(dtype), {}
        kd, vd = kc.float(), vc.float()
        kc[first, 0], vc[first, 0] = float("nan"), float("nan")
    elif fmt == "int8":
        (kc, ks), (vc, vs) = quantize_int8(k), quantize_int8(v)
        kd, vd = dequantize_int8(kc, ks), dequantize_int8(vc, vs)
        ks[first, 0], vs[first, 0] = float("nan"), float("nan")
        a = dict(k_scale=ks, v_scale=vs)
    elif fmt == "fp8":
        ks, vs = FP8_SCALES[0].to(DEVICE), FP8_SCALES[1].to(DEVICE)
        kc, vc = quantize_fp8(k, ks), quantize_fp8(v, vs)
        kd, vd = dequantize_fp8(kc, ks), dequantize_fp8(vc, vs)
        kc.view(torch.uint8)[first, 0] = NAN8
        vc.view(torch.uint8)[first, 0] = NAN8
        a = dict(k_scale=ks, v_scale=vs)
    else:
        bits = int4.FORMAT_BITS[fmt]
        kc, ks, kz = int4.quantize_keys(k, bits)
        for b in first:                                              # a sink's block: skip_first
            kc[b], ks[b], kz[b] = int4.quantize_keys(k[b], bits, skip_first=True)
        vc, vs, vz = int4.quantize_values(v, bits=bits)
        kd, vd = int4.dequantize_keys(kc, ks, kz, bits=bits), int4.dequantize_values(vc, vs, vz, bits=bits)
        res = [int(bt[s, (n - 1) // BS]) for s, n in enumerate(lens) if n % BS]
        a = dict(k_scale=ks, v_scale=vs, k_zero=kz, v_zero=vz,
                 k_res=torch.full((len(res) + 1, BS, HKV, D), float("nan"), device=DEVICE, dtype=dtype),
                 res_slot=torch.full((NB,), -1, dtype=torch.int32, device=DEVICE))
        a["v_res"] = a["k_res"].clone()
        for r, b in enumerate(res):
            a["res_slot"][b] = r
            a["k_res"][r], a["v_res"][r] = k[b].to(dtype), v[b].to(dtype)
            kd[b], vd[b] = k[b].to(dtype).float(), v[b].to(dtype).float()
            ks[b], kz[b], vs[b], vz[b] = (float("nan"),) * 4        # must not be read
            if b in sinks:
                a["k_res"][r, 0], a["v_res"][r, 0] = float("nan"), float("nan")
    for b, r in sinks.items():
        kd[b, 0], vd[b, 0] = pool["sink_k"][r].float(), pool["sink_v"][r].float()
    return kc, vc, {**a, **pool}, kd, vd, bt, ctx


def decode(q, kc, vc, bt, ctx, args, **kw):
    out = torch.full_like(q, float("nan"))
    return paged_decode_attention_v3(q, kc, vc, bt, ctx, scale_for(D), out=out, **args, **kw)


@pytest.mark.parametrize("fmt,dtype", [("auto", torch.float32), ("int8", torch.float32),
                                       ("fp8", torch.float32), ("int4", torch.float32),
                                       ("int2", torch.float32), ("int8", torch.bfloat16),
                                       ("fp8", torch.bfloat16), ("int4", torch.bfloat16)])
def test_decode_matches_reference(fmt, dtype):
    """Lengths 1, 20 (no sink row), BS - 1 and 150; one partition, then five (partition_size)."""
    kc, vc, args, kd, vd, bt, ctx = sink_cache(fmt, LENS, dtype, seed=len(fmt) + dtype.itemsize)
    q = torch.randn(len(LENS), 3 * HKV, D, device=DEVICE).to(dtype)
    ref = reference_decode(q, kd, vd, bt, ctx)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(decode(q, kc, vc, bt, ctx, args), ref) < tol
    out = decode(q, kc, vc, bt, ctx, args, partition_size=32, block_n=16)
    assert out.dtype == dtype and rel_err(out, ref) < tol


def test_prefill_with_sinks():
    """paged_triton.paged_prefill_attention on an int4 cache with sinks: a chunk after a cached
    prefix, a decode, a full prompt (its first block in the residual pool), a short chunk."""
    lens, q_lens = [40, 20, 7, 35], [8, 1, 7, 3]
    kc, vc, args, kd, vd, bt, ctx = sink_cache("int4", lens, seed=11)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(q_lens), 2 * HKV, D, device=DEVICE)
    out = paged_triton.paged_prefill_attention(q, kc, vc, bt, qsl, ctx, scale_for(D), **args)
    ref = [causal_attention(q[qsl[s]:qsl[s + 1]].double()[None], gather(kd, bt[s], n).double()[None],
                            gather(vd, bt[s], n).double()[None], q_offset=n - ql)[0]
           for s, (n, ql) in enumerate(zip(lens, q_lens))]
    assert rel_err(out, torch.cat(ref)) < 1e-5


# ---- bad arguments --------------------------------------------------------------------------
BAD = [({"sink_slot": None}, ValueError, r"all three or none\); missing sink_slot"),
       ({"sink_k": None, "sink_v": None}, ValueError, "missing sink_k, sink_v"),
       ({"sink_k": "half"}, TypeError, "sink_k must have dtype"),
       ({"sink_v": "half"}, TypeError, "sink_v must have dtype"),
       ({"sink_k": "narrow"}, ValueError, r"sink_k \(the sink pool\) must have shape \[R >= 1, 2, 64\]"),
       ({"sink_k": "empty"}, ValueError, r"sink_k \(the sink pool\) must have shape"),
       ({"sink_v": "narrow"}, ValueError, "sink_v has shape"),
       ({"sink_slot": "long"}, TypeError, "sink_slot must have dtype"),
       ({"sink_slot": "short"}, ValueError, "sink_slot has shape")]


def _bad(args, change):
    edit = {"half": lambda t: t.half(), "narrow": lambda t: t[:, :1].contiguous(),
            "empty": lambda t: t[:0], "long": lambda t: t.long(), "short": lambda t: t[:-1]}
    return {**args, **{n: (edit[c](args[n]) if isinstance(c, str) else c) for n, c in change.items()}}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("change,err,match", BAD)
def test_bad_arguments(fmt, change, err, match):
    kc, vc, args, kd, vd, bt, ctx = sink_cache(fmt, [5, 20], seed=5)
    q = torch.randn(2, 4, D, device=DEVICE)
    with pytest.raises(err, match=match):
        decode(q, kc, vc, bt, ctx, _bad(args, change))
    k, v = sink_tokens(2, seed=1)
    with pytest.raises(err, match=match):
        reshape_and_cache(k, v, kc, vc, torch.tensor([0, 1], device=DEVICE), **_bad(args, change))


def test_int4_write_checks_sink_rows():
    k, v = sink_tokens(2, seed=2)
    kc, vc, a = empty_cache("int4", 3, R_res=1)
    a["res_slot"][1] = 0
    pool = sink_pool(1, 3)
    pool["sink_slot"][1] = 1                                         # the pool has one row
    with pytest.raises(ValueError, match="past the sink pool"):
        reshape_and_cache(k, v, kc, vc, torch.tensor([BS, BS + 1], device=DEVICE), **a, **pool)
    kc, vc, a = empty_cache("int4", 3, R_res=1, bs=1)
    with pytest.raises(ValueError, match="block size of at least 2"):
        reshape_and_cache(k, v, kc, vc, torch.tensor([0, 1], device=DEVICE), **a, **pool)
