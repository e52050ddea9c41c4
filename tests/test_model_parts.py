"""Unit tests for every part of the model and for chapter 01's attention pieces.

Each fast part is compared with an independent slow formulation (float64, complex numbers, or
PyTorch's own scaled_dot_product_attention), on random inputs, with stated tolerances.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from kvlab.cache.base import NoCache, causal_attention
from kvlab.lab import attention_math as am
from kvlab.model.config import SMOLLM2_135M, LlamaConfig
from kvlab.model.layers import RMSNorm, SwiGLU, apply_rope, rope_cos_sin
from kvlab.model.llama import Llama


# ----------------------------------------------------------------------------------------- RoPE
def _rope(x, positions, theta=10000.0):
    """kvlab's RoPE on x [B, T, H, D] at integer positions [B, T]."""
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, dtype=x.dtype)
    return apply_rope(x, cos, sin)


def test_rope_preserves_norms():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 16, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 100, 1000, 8191]] * 2)
    y = _rope(x, pos)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)
    # position 0 is the identity rotation
    torch.testing.assert_close(y[:, 0], x[:, 0], rtol=0, atol=0)


def test_rope_dot_product_depends_only_on_relative_position():
    torch.manual_seed(1)
    q = torch.randn(1, 1, 1, 32, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 32, dtype=torch.float64)

    def score(m, n):
        return (_rope(q, torch.tensor([[m]])) * _rope(k, torch.tensor([[n]]))).sum().item()

    for delta in (0, 1, 5, 37):
        ref = score(delta, 0)
        for shift in (3, 250, 4000):
            assert score(shift + delta, shift) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert score(5, 0) != pytest.approx(score(6, 0), rel=1e-3)  # and it does depend on m - n


def test_rope_matches_complex_number_formulation():
    """RoPE as Su et al. (2021) write it: pairs are complex numbers multiplied by e^{i m theta_j}.

    In the rotate-half layout the pair j is (x_j, x_{j + D/2}).
    """
    torch.manual_seed(2)
    B, T, H, D, theta = 2, 9, 3, 16, 500.0
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    pos = torch.randint(0, 5000, (B, T))
    freqs = theta ** (-torch.arange(D // 2, dtype=torch.float64) * 2 / D)  # theta_j
    angle = pos.to(torch.float64)[..., None, None] * freqs  # [B, T, 1, D/2]
    z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.polar(torch.ones_like(angle), angle)
    ref = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(_rope(x, pos, theta), ref, rtol=1e-12, atol=1e-12)
    # float32, as the model runs it (angles computed in float64, then rounded)
    torch.testing.assert_close(_rope(x.float(), pos, theta), ref.float(), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------- RMSNorm
def test_rmsnorm_matches_float64_formula():
    torch.manual_seed(3)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = torch.randn(4, 5, 48) * 3
    x64, w64 = x.double(), norm.weight.double()
    ref = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-5) * w64
    torch.testing.assert_close(norm(x).double(), ref, rtol=1e-5, atol=1e-5)
    # bfloat16 in, bfloat16 out, computed in float32 inside
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=5e-2)


# --------------------------------------------------------------------------------------- SwiGLU
def test_swiglu_matches_formula():
    torch.manual_seed(4)
    mlp = SwiGLU(24, 40).double()
    x = torch.randn(3, 24, dtype=torch.float64)
    g, u = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    ref = (g / (1 + torch.exp(-g)) * u) @ mlp.down_proj.weight.T  # silu(g) = g * sigmoid(g)
    torch.testing.assert_close(mlp(x), ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ attention vs SDPA
def test_stable_softmax_survives_what_naive_softmax_cannot():
    x = torch.tensor([[1000.0, 999.0, 0.0], [-1e4, -1e4 + 1, -1e4 - 1]])
    assert torch.isnan(am.naive_softmax(x)).any()
    torch.testing.assert_close(am.stable_softmax(x), torch.softmax(x, -1))
    fully_masked = torch.full((1, 4), float("-inf"))
    assert torch.equal(am.stable_softmax(fully_masked), torch.zeros(1, 4))


def test_causal_mask_shapes_and_offsets():
    assert torch.equal(am.causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]]).bool())
    m = am.causal_mask(2, 5)  # the last 2 of 5 positions
    assert torch.equal(m, torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool())
    with pytest.raises(ValueError, match="tk .* must be >= tq"):
        am.causal_mask(5, 2)


@pytest.mark.parametrize("tq,tk", [(1, 1), (6, 6), (1, 9), (4, 11)])
def test_scaled_dot_product_attention_matches_sdpa(tq, tk):
    torch.manual_seed(5)
    q, k, v = torch.randn(2, 3, tq, 16), torch.randn(2, 3, tk, 16), torch.randn(2, 3, tk, 16)
    mask = am.causal_mask(tq, tk)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(am.scaled_dot_product_attention(q, k, v, causal=True), ref,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(am.scaled_dot_product_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    out, w = am.scaled_dot_product_attention(q, k, v, causal=True, return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, tq))
    assert (w.masked_select(~mask) == 0).all()


@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2), (6, 1)])  # MHA, GQA, MQA
def test_gqa_equals_mha_with_repeated_kv_heads(h, hkv):
    torch.manual_seed(6)
    B, T, D = 2, 7, 8
    q, k, v = torch.randn(B, h, T, D), torch.randn(B, hkv, T, D), torch.randn(B, hkv, T, D)
    out = am.grouped_query_attention(q, k, v, causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # explicitly: query head i reads KV head i // (h / hkv)
    g = h // hkv
    for i in range(h):
        one = F.scaled_dot_product_attention(q[:, i], k[:, i // g], v[:, i // g], is_causal=True)
        torch.testing.assert_close(out[:, i], one, rtol=1e-5, atol=1e-5)
    # and the model's reference attention ([B, T, H, D] layout) agrees too
    torch.testing.assert_close(causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
                               ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_multi_head_split_merge_round_trip_and_bad_heads():
    x = torch.randn(2, 5, 24)
    assert am.split_heads(x, 4).shape == (2, 4, 5, 6)
    assert torch.equal(am.merge_heads(am.split_heads(x, 4)), x)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        am.split_heads(x, 5)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        am.grouped_query_attention(torch.randn(1, 6, 2, 4), torch.randn(1, 4, 2, 4), torch.randn(1, 4, 2, 4))
    with pytest.raises(ValueError, match="group_size"):
        am.repeat_kv(torch.randn(1, 2, 3, 4), 0)


def test_kv_bytes_per_token_of_smollm2():
    c = SMOLLM2_135M
    per_token = am.kv_bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, 2)
    assert per_token == 2 * 30 * 3 * 64 * 2 == 23040
    mha = am.kv_bytes_per_token(c.num_layers, c.num_heads, c.head_dim, 2)
    assert mha == 3 * per_token  # GQA with 3 KV heads for 9 query heads: a third of the cache


# ------------------------------------------------------------------------------------ the model
def test_model_attention_layer_matches_from_scratch_attention(tiny_model, tiny_config):
    """One Llama attention layer, recomputed with attention_math and explicit RoPE."""
    torch.manual_seed(7)
    c = tiny_config
    attn = tiny_model.layers[0].self_attn
    x = torch.randn(2, 6, c.hidden_size)
    pos = torch.arange(6).expand(2, 6)
    cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta)
    with torch.no_grad():
        out = attn(x, cos, sin, cache=NoCache())
        q = apply_rope((x @ attn.q_proj.weight.T).view(2, 6, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope((x @ attn.k_proj.weight.T).view(2, 6, c.num_kv_heads, c.head_dim), cos, sin)
        v = (x @ attn.v_proj.weight.T).view(2, 6, c.num_kv_heads, c.head_dim)
        o = am.grouped_query_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        ref = am.merge_heads(o) @ attn.o_proj.weight.T
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_model_is_causal_and_batch_independent(tiny_model):
    torch.manual_seed(8)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        full = tiny_model(ids)
        prefix = tiny_model(ids[:, :6])
        single = tiny_model(ids[1:])
    torch.testing.assert_close(full[:, :6], prefix, rtol=1e-4, atol=1e-4)  # the future never leaks
    torch.testing.assert_close(full[1:], single, rtol=1e-4, atol=1e-4)
    assert full.dtype == torch.float32 and full.shape == (2, 10, 256)
    with torch.no_grad():
        assert tiny_model(ids, last_only=True).shape == (2, 1, 256)
        torch.testing.assert_close(tiny_model(ids, logit_indices=torch.tensor([3, 15])),
                                   full.reshape(20, 256)[[3, 15]], rtol=1e-5, atol=1e-5)


def test_model_rejects_bad_input_ids(tiny_model):
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, tokens\]"):
        tiny_model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 256\)"):
        tiny_model(torch.tensor([[1, 256]]))


def test_parameter_count_matches_the_module(tiny_config):
    for cfg in (tiny_config, LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                         num_layers=1, num_heads=4, num_kv_heads=1, head_dim=8,
                                         tie_word_embeddings=False)):
        with torch.device("meta"):
            m = Llama(cfg)
        assert cfg.num_parameters() == sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------- LlamaConfig
@pytest.mark.parametrize("kwargs,match", [
    ({"num_heads": 0}, r"num_heads must be positive, got 0"),
    ({"hidden_size": -8}, r"hidden_size must be positive, got -8"),
    ({"num_heads": 9, "num_kv_heads": 4}, r"num_heads \(9\) must be a multiple of num_kv_heads \(4\)"),
    ({"head_dim": 63}, r"head_dim must be even for RoPE, got 63"),
    ({"vocab_size": 0}, r"vocab_size must be positive"),
])
def test_llama_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**kwargs)


def test_llama_config_group_size():
    assert SMOLLM2_135M.group_size == 3
    assert LlamaConfig(num_heads=8, num_kv_heads=8).group_size == 1
    assert LlamaConfig(num_heads=8, num_kv_heads=1).group_size == 8
    assert math.isclose(SMOLLM2_135M.num_parameters() / 1e6, 134.5, abs_tol=0.1)
