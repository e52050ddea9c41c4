"""Round-trip error bounds of every KV-cache format on random and adversarial tensors."""
import math

import pytest
import torch

from kvlab.model.config import SMOLLM2_135M
from kvlab.quant import KV_CACHE_DTYPES, bytes_per_token, check_kv_cache_dtype, fp8, int4, int8

EPS = 1e-6  # float32 arithmetic on top of the format's own bound


def adversarial(shape):
    """Random, constant rows, zeros, one huge outlier channel, tiny values."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    cases = {"random": x, "zeros": torch.zeros(shape), "constant": torch.full(shape, -3.25),
             "tiny": x * 1e-6}
    out = x.clone()
    out[..., 5] *= 1000.0
    cases["outlier_channel"] = out
    big = x.clone()
    big[0, 0, 0, 0] = 5e3
    cases["one_huge"] = big
    return cases


@pytest.mark.parametrize("name", ["random", "zeros", "constant", "tiny", "outlier_channel", "one_huge"])
def test_int8_error_at_most_half_a_step(name):
    x = adversarial((4, 16, 3, 64))[name]
    q, s = int8.quantize_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == x.shape[:-1]
    err = (int8.dequantize_int8(q, s) - x).abs()
    assert (err <= s.float().unsqueeze(-1) / 2 * (1 + EPS) + EPS * x.abs()).all()
    amax = x.abs().amax(-1)  # the scale is amax/127 rounded up (at most 2**-10 more), or the floor
    assert (s.float() <= torch.clamp(amax / 127, min=int8.MIN_SCALE) * (1 + 2**-10)).all()


@pytest.mark.parametrize("name", ["random", "zeros", "constant", "tiny", "outlier_channel", "one_huge"])
@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_calibrated_error_is_relative(name, per_head):
    x = adversarial((4, 16, 3, 64))[name]
    s = fp8.fp8_scale(x, per_head=per_head)
    assert s.shape == ((3,) if per_head else ())
    q = fp8.quantize_fp8(x, s)
    assert q.dtype == torch.float8_e4m3fn
    err = (fp8.dequantize_fp8(q, s) - x).abs()
    s_b = s.view(-1, 1) if per_head else s
    # normal numbers: half of 2**-3 relative spacing; subnormals: half of 2**-9 absolute (times scale)
    assert (err <= torch.maximum(x.abs() * 2**-4, s_b * 2**-10) * (1 + EPS) + 1e-30).all()


def test_fp8_default_scale_saturates_and_flushes():
    x = torch.tensor([[[1000.0, -1000.0, 1.0, 1e-4]]])
    y = fp8.dequantize_fp8(fp8.quantize_fp8(x))  # scale 1.0: the raw values are the fp8 values
    assert y.tolist() == [[[448.0, -448.0, 1.0, 0.0]]]


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("name", ["random", "zeros", "constant", "tiny", "outlier_channel", "one_huge"])
def test_int4_keys_per_channel_error_bound(name, bits):
    x = adversarial((4, 16, 3, 64))[name]  # 4 blocks of a 16-token group
    p, s, z = int4.quantize_keys(x, bits)
    assert p.shape == (4, 16, 3, 8 * bits) and p.dtype == torch.uint8 and s.shape == z.shape == (4, 3, 64)
    err = (int4.dequantize_keys(p, s, z, bits=bits) - x).abs()
    assert (err <= s.float().unsqueeze(-3) / 2 * (1 + EPS) + EPS * x.abs()).all()
    assert (z.float() <= x.amin(-3)).all()  # zero point rounded down: no value below code 0


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("name", ["random", "zeros", "constant", "tiny", "outlier_channel", "one_huge"])
def test_int4_values_per_token_error_bound(name, bits):
    x = adversarial((4, 16, 3, 64))[name]
    p, s, z = int4.quantize_values(x, bits=bits)
    assert p.shape == (4, 16, 3, 8 * bits) and s.shape == z.shape == (4, 16, 3, 64 // int4.VALUE_GROUP)
    err = (int4.dequantize_values(p, s, z, bits=bits) - x).abs()
    bound = s.float().repeat_interleave(int4.VALUE_GROUP, dim=-1) / 2
    assert (err <= bound * (1 + EPS) + EPS * x.abs()).all()


def test_int4_per_channel_keys_beat_per_token_on_outlier_channels():
    """The reason KIVI quantizes keys per channel: one loud channel ruins per-token scales."""
    torch.manual_seed(1)
    k = torch.randn(16, 1, 64)
    k[..., 3] += 40.0
    per_channel = (int4.dequantize_keys(*int4.quantize_keys(k)) - k).pow(2).mean()
    per_token = (int4.dequantize_values(*int4.quantize_values(k, group=64)) - k).pow(2).mean()
    assert per_channel * 10 < per_token


def test_pack_int4_low_nibble_is_even_channel():
    q = torch.tensor([1, 2, 15, 0], dtype=torch.uint8)
    p = int4.pack_int4(q)
    assert p.tolist() == [1 | 2 << 4, 15]
    codes = torch.randint(0, 16, (5, 3, 64), dtype=torch.uint8)
    assert torch.equal(int4.unpack_int4(int4.pack_int4(codes)), codes)


def test_pack_int2_four_codes_per_byte():
    q = torch.tensor([1, 2, 3, 0, 3, 3, 3, 3], dtype=torch.uint8)
    assert int4.pack_codes(q, 2).tolist() == [1 | 2 << 2 | 3 << 4, 255]
    codes = torch.randint(0, 4, (5, 3, 64), dtype=torch.uint8)
    assert torch.equal(int4.unpack_codes(int4.pack_codes(codes, 2), 2), codes)
    with pytest.raises(ValueError, match="divisible by 4"):
        int4.pack_codes(codes[..., :6], 2)
    with pytest.raises(ValueError, match="bits must be 4"):
        int4.quantize_keys(torch.randn(4, 1, 8), bits=3)
    with pytest.raises(ValueError, match="int2 needs a head_dim that is a multiple of 4"):
        int4.value_group(6, bits=2)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_input_is_rejected(bad):
    x = torch.randn(2, 16, 3, 64)
    x[1, 2, 0, 7] = bad
    for f in (int8.quantize_int8, lambda t: fp8.quantize_fp8(t, 1.0), lambda t: fp8.fp8_scale(t),
              int4.quantize_keys, int4.quantize_values):
        with pytest.raises(ValueError, match="non-finite"):
            f(x)


def test_out_of_range_magnitudes_are_rejected():
    with pytest.raises(ValueError, match="float16 zero points"):
        int4.quantize_keys(torch.full((16, 1, 64), 1e6))
    with pytest.raises(ValueError, match="float16 scales"):
        int8.quantize_int8(torch.full((1, 64), 1e8))


def test_unknown_kv_cache_dtype_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        check_kv_cache_dtype("int3")
    for name in KV_CACHE_DTYPES:
        assert repr(name) in str(e.value)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        bytes_per_token(SMOLLM2_135M, "bf16")


def test_bytes_per_token_counts_scales():
    c = SMOLLM2_135M  # 30 layers, 3 KV heads, head dim 64
    per_head = lambda f, bs=16: bytes_per_token(c, f, bs) / (c.num_layers * c.num_kv_heads)  # noqa: E731
    assert per_head("auto") == 2 * 64 * 2  # bfloat16 K and V
    assert bytes_per_token(c, "auto", model_dtype=torch.float32) == 2 * 30 * 3 * 64 * 4
    assert per_head("int8") == 2 * (64 + 2)  # + float16 scale per token
    assert per_head("fp8") == 2 * 64
    # int4: 32 bytes of codes (K+V) + key scale/zero per channel per block + value scale/zero per 32
    assert per_head("int4", 16) == 64 + 2 * 2 * 64 / 16 + 2 * 2 * 2
    assert per_head("int4", 32) == 64 + 2 * 2 * 64 / 32 + 2 * 2 * 2
    assert math.isclose(per_head("auto") / per_head("int4", 32), 3.2)
    assert per_head("int2", 32) == 32 + 2 * 2 * 64 / 32 + 2 * 2 * 2    # 16 bytes of codes (K+V)
    assert bytes_per_token(c, "int2") == bytes_per_token(c, "int2", 32)  # its default block size
