"""Attention-sink preservation in the accuracy twin: `FakeQuantKVCache(keep_first=n)` stores the first
n positions of every sequence as written, in full precision, and everything else as before."""
import copy

import pytest
import torch

from kvlab.quant import fp8, int4
from kvlab.quant.sim import FakeQuantKVCache, roundtrip

FORMATS = ["int8", "fp8", "int4", "int2"]
B, T, HKV, D, G = 2, 29, 2, 16, 8   # 3 complete groups of 8 and a residual of 5


def _kv(seed=0):
    """q [B, T, 4, D], k and v [B, T, Hkv, D]; keys on a per-channel offset (as in Llama-style
    models) with a first token far from it (a sink), so every format and the key shift matter."""
    g = torch.Generator().manual_seed(seed)
    shift = 4 * torch.randn(HKV, D, generator=g)
    q = torch.randn(B, T, 2 * HKV, D, generator=g)
    k = shift + torch.randn(B, T, HKV, D, generator=g)
    k[:, 0] = -3 * shift                                    # the sink: far from the mean key
    v = torch.randn(B, T, HKV, D, generator=g)
    return q, k, v, shift


def _calibration(k, shift):
    """Per-head fp8 scales over the deviation from `shift`, and the shift (smoothed keys)."""
    return fp8.Fp8Calibration([fp8.fp8_scale(k - shift, per_head=True)], [torch.tensor(0.01)], [shift])


def _fill(fmt, chunk=T, **kw):
    """One layer of a FakeQuantKVCache fed q, k, v in pieces of `chunk` tokens: (cache, outputs)."""
    q, k, v, shift = _kv()
    cal = _calibration(k, shift) if fmt == "fp8" else None
    c = FakeQuantKVCache(1, B, HKV, D, T, fmt, group_size=G, fp8_calibration=cal, **kw)
    outs = []
    for t in range(0, T, chunk):
        outs.append(c.attend(0, q[:, t:t + chunk], k[:, t:t + chunk], v[:, t:t + chunk]))
        c.advance(q[:, t:t + chunk].shape[1])
    return c, torch.cat(outs, dim=1)


def _quantize_group(fmt, k, v):
    """What int4/int2 stores for tokens quantized together as one key group."""
    bits = int4.FORMAT_BITS[fmt]
    return (int4.dequantize_keys(*int4.quantize_keys(k, bits), k.dtype, bits),
            int4.dequantize_values(*int4.quantize_values(v, bits=bits), v.dtype, bits))


@pytest.mark.parametrize("fmt", ["auto", *FORMATS])
def test_keep_first_zero_stores_what_the_format_stores(fmt):
    """keep_first=0 is the default, and the stored values are the format's own, computed here
    independently of the cache: per token for int8/fp8, per complete group for int4/int2."""
    c, out = _fill(fmt)
    c0, out0 = _fill(fmt, keep_first=0)
    assert torch.equal(c.k[0], c0.k[0]) and torch.equal(c.v[0], c0.v[0]) and torch.equal(out, out0)
    _, k, v, shift = _kv()
    if fmt in int4.FORMAT_BITS:
        want_k, want_v = k.clone(), v.clone()   # the residual stays in full precision
        for g0 in range(0, T - G + 1, G):
            want_k[:, g0:g0 + G], want_v[:, g0:g0 + G] = _quantize_group(fmt, k[:, g0:g0 + G], v[:, g0:g0 + G])
    else:
        cal = c.fp8
        want_k = roundtrip(k, fmt, cal.k_scales[0], cal.k_shift[0] if cal.k_shift else None)
        want_v = roundtrip(v, fmt, cal.v_scales[0])
    assert torch.equal(c0.k[0], want_k) and torch.equal(c0.v[0], want_v)
    if fmt != "auto":
        assert not torch.equal(c0.k[0][:, 0], k[:, 0])      # the sink's key is rounded


@pytest.mark.parametrize("keep", [1, 3, 8, 13])
@pytest.mark.parametrize("fmt", FORMATS)
def test_kept_positions_are_full_precision_and_the_rest_unchanged(fmt, keep):
    """The first `keep` positions hold what the full-precision cache holds (for fp8 that is the
    key, not the key minus the shift: this cache adds the shift back to every key it dequantizes).
    int8/fp8: every later position equals keep_first=0's. int4/int2: later complete groups and the
    residual equal keep_first=0's; a group that starts with kept tokens quantizes only the others,
    with scales from them alone."""
    auto, _ = _fill("auto")
    c0, _ = _fill(fmt)
    c, _ = _fill(fmt, keep_first=keep)
    assert torch.equal(c.k[0][:, :keep], auto.k[0][:, :keep])
    assert torch.equal(c.v[0][:, :keep], auto.v[0][:, :keep])
    after = keep if fmt not in int4.FORMAT_BITS else -(-keep // G) * G   # the next group boundary
    assert torch.equal(c.k[0][:, after:], c0.k[0][:, after:])
    assert torch.equal(c.v[0][:, after:], c0.v[0][:, after:])
    if keep < after:                                      # the group the kept tokens share
        _, k, v, _ = _kv()
        want_k, want_v = _quantize_group(fmt, k[:, keep:after], v[:, keep:after])
        assert torch.equal(c.k[0][:, keep:after], want_k) and torch.equal(c.v[0][:, keep:after], want_v)
        assert not torch.equal(c.k[0][:, keep:after], c0.k[0][:, keep:after])   # the sink left the scales


@pytest.mark.parametrize("fmt", FORMATS)
def test_keeping_every_position_is_the_full_precision_cache(fmt):
    auto, out_auto = _fill("auto")
    c, out = _fill(fmt, keep_first=T + 5)
    assert torch.equal(c.k[0], auto.k[0]) and torch.equal(c.v[0], auto.v[0])
    torch.testing.assert_close(out, out_auto, atol=1e-6, rtol=1e-6)   # int4 attends in group pieces


@pytest.mark.parametrize("bad", [-1, 1.5, "4", None, True])
def test_bad_keep_first_is_rejected(bad):
    with pytest.raises(ValueError, match="keep_first"):
        FakeQuantKVCache(1, B, HKV, D, T, "int8", keep_first=bad)


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 5, 8])
@pytest.mark.parametrize("fmt", [*FORMATS, "fp8 smoothed"])
def test_chunked_equals_token_by_token_with_keep_first(tiny_model, fmt, keep):
    """The timing the accuracy benchmarks rely on holds with kept positions: chunks of 7 through
    the model (crossing the kept boundary and the groups of 8) == one token at a time."""
    from kvlab.quant.fp8 import calibrate_fp8

    model = copy.deepcopy(tiny_model).double()
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    kw = {"group_size": 8, "keep_first": keep}
    if fmt == "fp8 smoothed":
        fmt, kw["fp8_calibration"] = "fp8", calibrate_fp8(model, [ids])
    mk = lambda: FakeQuantKVCache.for_model(model, 2, 30, fmt, **kw)  # noqa: E731
    c = mk()
    one = torch.cat([model(ids[:, t:t + 1], cache=c) for t in range(30)], dim=1)
    c = mk()
    chunks = torch.cat([model(ids[:, t:t + 7], cache=c) for t in range(0, 30, 7)], dim=1)
    torch.testing.assert_close(chunks, one, atol=1e-9, rtol=1e-9)
    c0 = FakeQuantKVCache.for_model(model, 2, 30, fmt, **{**kw, "keep_first": 0})
    assert not torch.allclose(model(ids, cache=c0), chunks, atol=1e-9, rtol=1e-9)   # keeping mattered
