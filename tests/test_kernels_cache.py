"""The cache-write kernel (reshape_and_cache) and the fused-dequantization decode (v3, int8/fp8).

The write must produce exactly what the PyTorch quantizers of kvlab.quant produce, bit for bit:
int8 codes and float16 scales, and fp8 codes. For fp8 the kernel rounds to the nearest e4m3 value
in float32 before the cast (Triton's CPU interpreter rounds some float -> fp8 casts wrongly: carries
into the exponent, ties, subnormals), so the cast is exact on every target; the fp8 write test
covers every e4m3 value, the midpoints between neighbours and the floats next to them.
"""
import pytest
import torch

pytest.importorskip("triton", reason="Triton is Linux-only; the kernels cannot run here")
from helpers import DEVICE, random_paged, reference_decode, rel_err, scale_for

from kvlab.kernels.decode_attention_v3 import paged_decode_attention_v3
from kvlab.kernels.reshape_and_cache import reshape_and_cache

_fp8 = pytest.importorskip("kvlab.quant.fp8")
_int8 = pytest.importorskip("kvlab.quant.int8")
quantize_fp8, dequantize_fp8 = _fp8.quantize_fp8, _fp8.dequantize_fp8
quantize_int8, dequantize_int8 = _int8.quantize_int8, _int8.dequantize_int8

NB, BS = 6, 16


def new_tokens(N, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(N, Hkv, D, generator=g) * torch.rand(N, Hkv, 1, generator=g) * 4
    v = torch.randn(N, Hkv, D, generator=g)
    k[0, 0] = 0.0                                                 # an all-zero row: smallest scale
    slots = torch.randperm(NB * BS, generator=g)[:N]
    slots[1] = -1                                                 # padding: must not be written
    return k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_float(dtype):
    k, v, slots = new_tokens(10, 3, 64)
    k, v = k.to(dtype), v.to(dtype)
    kc = torch.full((NB, BS, 3, 64), float("nan"), device=DEVICE, dtype=dtype)
    vc = kc.clone()
    reshape_and_cache(k, v, kc, vc, slots)
    keep = slots >= 0
    assert torch.equal(kc.view(-1, 3, 64)[slots[keep]], k[keep])
    assert torch.equal(vc.view(-1, 3, 64)[slots[keep]], v[keep])
    assert int((~torch.isnan(kc.view(-1, 3, 64)[:, 0, 0])).sum()) == int(keep.sum())


@pytest.mark.parametrize("D", [64, 128])
def test_write_int8_bit_identical(D):
    k, v, slots = new_tokens(12, 2, D, seed=D)
    kc = torch.zeros(NB, BS, 2, D, device=DEVICE, dtype=torch.int8)
    vc = kc.clone()
    ks = torch.full((NB, BS, 2), float("nan"), device=DEVICE, dtype=torch.float16)
    vs = ks.clone()
    reshape_and_cache(k, v, kc, vc, slots, ks, vs)
    keep = slots >= 0
    for x, c, s in ((k, kc, ks), (v, vc, vs)):
        q_ref, s_ref = quantize_int8(x[keep])
        assert torch.equal(c.view(-1, 2, D)[slots[keep]], q_ref)
        assert torch.equal(s.view(-1, 2)[slots[keep]], s_ref)


def fp8_hard_values():
    """Every finite e4m3 value, the midpoints between neighbours (ties), the floats just above and
    below them, signed zeros, values past 448, and random values over seven decades."""
    allv = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    srt = allv[torch.isfinite(allv)].unique()
    mids = (srt[1:] + srt[:-1]) / 2
    g = torch.Generator().manual_seed(3)
    return torch.cat([srt, mids, torch.nextafter(mids, torch.tensor(1e9)),
                      torch.nextafter(mids, torch.tensor(-1e9)), torch.tensor([0.0, -0.0, 500, -1e4]),
                      torch.randn(2000, generator=g) * torch.logspace(-4, 3, 2000)])


@pytest.mark.parametrize("per_head", [False, True])
def test_write_fp8_bit_identical(per_head):
    x = fp8_hard_values()
    H, D = 2, 64
    n = -(-x.numel() // (H * D))
    x = torch.cat([x, torch.zeros(n * H * D - x.numel())]).view(n, H, D).to(DEVICE)
    scale = (torch.tensor([0.37, 1.0]) if per_head else torch.tensor(1.0)).to(DEVICE)
    kc = torch.zeros(n + 1, 1, H, D, device=DEVICE, dtype=torch.float8_e4m3fn)
    vc = kc.clone()
    slots = torch.arange(n, device=DEVICE)
    reshape_and_cache(x, -x, kc, vc, slots, scale, scale)
    for src, c in ((x, kc), (-x, vc)):
        assert torch.equal(c[:n, 0].view(torch.uint8), quantize_fp8(src, scale).view(torch.uint8))
    assert (kc[n].view(torch.uint8) == 0).all()                   # an unwritten slot stays empty


@pytest.mark.parametrize("per_head", [False, True])
def test_write_fp8_scattered_slots(per_head):
    k, v, slots = new_tokens(12, 2, 64, seed=5)
    scale = (torch.tensor([0.02, 0.05]) if per_head else torch.tensor(0.03)).to(DEVICE)
    kc = torch.zeros(NB, BS, 2, 64, device=DEVICE, dtype=torch.float8_e4m3fn)
    vc = kc.clone()
    reshape_and_cache(k, v, kc, vc, slots, scale, scale)
    keep = slots >= 0
    for x, c in ((k, kc), (v, vc)):
        got = c.view(-1, 2, 64)[slots[keep]].view(torch.uint8)
        assert torch.equal(got, quantize_fp8(x[keep], scale).view(torch.uint8))


def quantized_cache(fmt, lens, Hkv, D, seed):
    """A random paged cache quantized with kvlab.quant, plus its dequantized float copy."""
    k, v, bt, ctx = random_paged(lens, Hkv, D, BS, seed=seed)
    if fmt == "int8":
        (kq, ks), (vq, vs) = quantize_int8(k), quantize_int8(v)
        kd, vd = dequantize_int8(kq, ks), dequantize_int8(vq, vs)
    else:
        ks = torch.linspace(0.005, 0.01, Hkv, device=DEVICE)
        vs = torch.tensor(0.01, device=DEVICE)
        vs = vs.expand(Hkv).contiguous()
        kq, vq = quantize_fp8(k, ks), quantize_fp8(v, vs)
        kd, vd = dequantize_fp8(kq, ks), dequantize_fp8(vq, vs)
    return (kq, vq, ks, vs), (kd, vd), bt, ctx


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("group,D", [(1, 64), (3, 128), (4, 64)])
def test_fused_dequant_decode(fmt, group, D):
    lens = [1, BS - 1, BS, 200]
    (kq, vq, ks, vs), (kd, vd), bt, ctx = quantized_cache(fmt, lens, 2, D, seed=group + D)
    q = torch.randn(len(lens), 2 * group, D, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention_v3(q, kq, vq, bt, ctx, scale_for(D), k_scale=ks, v_scale=vs, out=out,
                              partition_size=128)
    # the reference reads the same quantized values (dequantized by kvlab.quant): only the
    # kernel's arithmetic is under test here, not the format's rounding
    assert rel_err(out, reference_decode(q, kd, vd, bt, ctx)) < 1e-5


def test_write_rejects_bad_inputs():
    k, v, slots = new_tokens(4, 2, 64)
    kc = torch.zeros(NB, BS, 2, 64, device=DEVICE, dtype=torch.int8)
    with pytest.raises(ValueError, match="k_scale is required"):
        reshape_and_cache(k, v, kc, kc.clone(), slots)
    with pytest.raises(TypeError, match="k_scale must have dtype"):
        s = torch.zeros(NB, BS, 2, device=DEVICE)
        reshape_and_cache(k, v, kc, kc.clone(), slots, s, s)
    with pytest.raises(ValueError, match=r"k_scale must have shape"):
        s = torch.zeros(NB, BS, 3, device=DEVICE, dtype=torch.float16)
        reshape_and_cache(k, v, kc, kc.clone(), slots, s, s)
    with pytest.raises(TypeError, match="slot_mapping"):
        fc = torch.zeros(NB, BS, 2, 64, device=DEVICE)
        reshape_and_cache(k, v, fc, fc.clone(), slots.int())
    with pytest.raises(ValueError, match="v has shape"):
        reshape_and_cache(k, v[:, :1].contiguous(), fc, fc.clone(), slots)
    with pytest.raises(ValueError, match="not a supported cache format"):
        bc = torch.zeros(NB, BS, 2, 64, device=DEVICE, dtype=torch.int16)
        reshape_and_cache(k, v, bc, bc.clone(), slots)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_fused_dequant_decode_bf16_query(fmt):
    """bf16 queries on a quantized cache: the dots run in fp16 (see decode_attention_v3)."""
    lens = [3, 70]
    (kq, vq, ks, vs), (kd, vd), bt, ctx = quantized_cache(fmt, lens, 2, 64, seed=9)
    q = torch.randn(len(lens), 8, 64, device=DEVICE).bfloat16()
    out = torch.full_like(q, float("nan"))
    paged_decode_attention_v3(q, kq, vq, bt, ctx, scale_for(64), k_scale=ks, v_scale=vs, out=out)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference_decode(q, kd, vd, bt, ctx)) < 1e-2
