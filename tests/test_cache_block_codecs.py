"""kvlab.cache.block_codecs: each built-in format's codec round-trips K/V through its block
storage as a slow float64 twin (written here from the format's definition, loops per group) says."""
import itertools

import pytest
import torch

from kvlab.cache.block_codecs import CODECS, Fp8Codec, Int2Codec, Int4Codec, Int8Codec, make_codec
from kvlab.quant import fp8

L, NB, BS, H, D = 2, 6, 4, 2, 64


def fp16_up(x: float) -> float:
    """x rounded up to a float16 value (scales)."""
    s = torch.tensor(x, dtype=torch.float64).half()
    if float(s) < x:
        s = torch.nextafter(s, torch.tensor(float("inf"), dtype=torch.float16))
    return float(s)


def fp16_down(x: float) -> float:
    """x rounded down to a float16 value (zero points)."""
    s = torch.tensor(x, dtype=torch.float64).half()
    if float(s) > x:
        s = torch.nextafter(s, torch.tensor(float("-inf"), dtype=torch.float16))
    return float(s)


def twin_int8(x):
    """Per token and head: symmetric, scale = amax / 127 rounded up to float16."""
    out, steps = torch.empty_like(x), torch.empty(x.shape[:-1], dtype=torch.float64)
    for idx in itertools.product(*map(range, x.shape[:-1])):
        row = x[idx]
        s = fp16_up(max(float(row.abs().max()) / 127, float(torch.finfo(torch.float16).tiny)))
        out[idx] = torch.round(row / s).clamp(-127, 127) * s
        steps[idx] = s
    return out, steps


def twin_asym(x, levels):
    """One group (a 1-d tensor): zero = min rounded down, scale = (max - zero) / levels rounded up."""
    z = fp16_down(float(x.min()))
    s = fp16_up(max((float(x.max()) - z) / levels, float(torch.finfo(torch.float16).tiny)))
    return torch.round((x - z) / s).clamp(0, levels) * s + z, s


def twin_kivi(k, v, bits, skip_first):
    """Keys per channel over the block's tokens (token 0 left out of the range where skip_first[b]);
    values per token per group of 32 channels."""
    levels = 2**bits - 1
    kd, vd = torch.empty_like(k), torch.empty_like(v)
    ks, vs = torch.empty_like(k), torch.empty_like(v)
    for b in range(k.shape[0]):
        for h in range(H):
            for c in range(D):
                col = k[b, :, h, c]
                rng = col[1:] if skip_first[b] else col
                z = fp16_down(float(rng.min()))
                s = fp16_up(max((float(rng.max()) - z) / levels, float(torch.finfo(torch.float16).tiny)))
                kd[b, :, h, c] = torch.round((col - z) / s).clamp(0, levels) * s + z
                ks[b, :, h, c] = s
            for t in range(BS):
                for g in range(0, D, 32):
                    vd[b, t, h, g:g + 32], vs[b, t, h, g:g + 32] = twin_asym(v[b, t, h, g:g + 32], levels)
    return kd, vd, ks, vs


def random_kv(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, H, D, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, D, dtype=torch.float64)
    return k, torch.randn(n, H, D, generator=g, dtype=torch.float64)


def close_to_twin(got, want, step):
    """Equal to the twin within a float32 rounding, or (a tie broken the other way) one step apart."""
    err = (got - want).abs()
    assert bool((err <= step * 1.0001 + 1e-12).all())
    assert float((err > 1e-5 * (1 + want.abs())).double().mean()) < 0.01


def test_registry_and_errors():
    assert set(CODECS) == {"int8", "fp8", "int4", "int2"}
    assert not Int8Codec.seals_blocks and not Fp8Codec.seals_blocks
    assert Int4Codec.seals_blocks and Int2Codec.seals_blocks and (Int4Codec.bits, Int2Codec.bits) == (4, 2)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        make_codec("auto", L, NB, BS, H, D)
    with pytest.raises(ValueError, match="only for kv_cache_dtype='fp8'"):
        make_codec("int8", L, NB, BS, H, D, fp8_calibration=fp8.Fp8Calibration([1.0] * L, [1.0] * L))
    c = make_codec("int4", L, NB, BS, H, D)
    k, v = random_kv(3)
    with pytest.raises(ValueError, match="whole blocks"):
        c.encode(0, k.float(), v.float(), torch.tensor([4, 5, 6]))


def test_int8_codec_equals_twin():
    c = make_codec("int8", L, NB, BS, H, D)
    k, v = random_kv(7)
    slots = torch.tensor([0, 1, 2, 9, 10, 11, 21])
    c.encode(1, k.float(), v.float(), slots)
    kd, vd = c.decode(1, torch.arange(NB), torch.float64)
    for x, dec in ((k, kd), (v, vd)):
        want, step = twin_int8(x)
        got = dec.flatten(0, 1)[slots]
        close_to_twin(got, want, step[..., None])
        assert bool(((got - x).abs() <= step[..., None] / 2 * 1.0001).all())   # error <= scale / 2
    assert c.nbytes == L * 2 * NB * BS * H * (D + 2)


@pytest.mark.parametrize("smooth", [False, True])
def test_fp8_codec_equals_twin(smooth):
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    grid = grid[torch.isfinite(grid)].unique()
    shift = [torch.randn(H, D, generator=torch.Generator().manual_seed(i)) for i in range(L)] if smooth else None
    cal = fp8.Fp8Calibration([torch.tensor(0.01)] * L, [torch.tensor([0.01, 0.02])] * L, shift)
    c = make_codec("fp8", L, NB, BS, H, D, fp8_calibration=cal)
    k, v = random_kv(5, seed=1)
    slots = torch.tensor([3, 4, 5, 12, 23])
    c.encode(0, c.store_keys(0, k.float()), v.float(), slots)
    kd, vd = c.decode(0, torch.arange(NB), torch.float64)
    sh = shift[0].double() if smooth else torch.zeros(H, D, dtype=torch.float64)
    for x, dec, s, off in ((k, kd, 0.01, sh), (v, vd, torch.tensor([0.01, 0.02])[:, None], 0)):
        y = ((x - off) / torch.as_tensor(s, dtype=torch.float64)).clamp(-448, 448)
        nearest = grid[(y[..., None] - grid).abs().argmin(-1)]
        want = nearest * torch.as_tensor(s, dtype=torch.float64) + off
        step = (want - off).abs() / 8 + 2**-9 * torch.as_tensor(s, dtype=torch.float64)   # e4m3 spacing
        close_to_twin(dec.flatten(0, 1)[slots], want, step)


@pytest.mark.parametrize("codec", [Int4Codec, Int2Codec])
@pytest.mark.parametrize("skip_first", [False, True])
def test_kivi_codec_equals_twin(codec, skip_first):
    c = codec(L, NB, BS, H, D)
    k, v = random_kv(2 * BS, seed=2)
    blocks = torch.tensor([4, 1])
    slots = (blocks[:, None] * BS + torch.arange(BS)).flatten()
    c.encode(1, k.float(), v.float(), slots, skip_first=torch.tensor([skip_first, False]))
    kd, vd = c.decode(1, blocks, torch.float64)
    kw, vw, ks, vs = twin_kivi(k.view(2, BS, H, D), v.view(2, BS, H, D), codec.bits, [skip_first, False])
    read = torch.ones(2, BS, dtype=torch.bool)
    read[0, 0] = not skip_first     # a sink's codes are clamped and never read (its row is)
    close_to_twin(kd[read], kw[read], ks[read])
    close_to_twin(vd, vw, vs)
    assert bool(((kd - k.view(2, BS, H, D))[read].abs() <= ks[read] / 2 * 1.001 + 1e-3).all())
    assert c.k_cache[1].shape == (NB, BS, H, D * codec.bits // 8)
