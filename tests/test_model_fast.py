"""kvlab.model.fast.FastLlama, the packed-weight CPU twin of the reference Llama: the same logits
on random weights (float64), through every cache; the same greedy tokens in the engine, on the
tiny model and on the real one."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import random_llama

import kvlab
from kvlab import SamplingParams
from kvlab.cache.contiguous import ContiguousKVCache
from kvlab.model.fast import FastLlama, PackedLinear, can_prepack, rms_norm, rope_
from kvlab.model.layers import RMSNorm, apply_rope, rope_cos_sin

# float64 weights, but both models take RMSNorm in float32 (as the reference does): float32 precision
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rms_norm_and_rope_equal_the_layers(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 7, 48, generator=g) * 3).to(dtype)
    norm = RMSNorm(48, 1e-5).to(dtype)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(**TOL)
    torch.testing.assert_close(rms_norm(x, norm.weight, 1e-5), norm(x), **tol)
    q = torch.randn(5, 7, 4, 16, generator=g).to(dtype)
    cos, sin = rope_cos_sin(torch.randint(0, 500, (5, 7), generator=g), 16, 10000.0, dtype=dtype)
    got = rope_(q.view(35, 4, 16), cos.view(35, 1, 16), sin.view(35, 1, 16)).to(dtype).view(5, 7, 4, 16)
    torch.testing.assert_close(got, apply_rope(q, cos, sin), rtol=0, atol=0)


@pytest.mark.parametrize("tie", [True, False])
@torch.inference_mode()
def test_logits_equal_the_reference_float64(tie):
    ref = random_llama(tie=tie)
    fast = FastLlama.from_llama(ref)
    ids = torch.randint(0, 96, (3, 13), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fast(ids), ref(ids), **TOL)
    torch.testing.assert_close(fast(ids, last_only=True), ref(ids, last_only=True), **TOL)
    idx = torch.tensor([0, 5, 38])
    torch.testing.assert_close(fast(ids, logit_indices=idx), ref(ids, logit_indices=idx), **TOL)
    # through a contiguous cache: a prompt, then one token at a time
    c = ref.config
    caches = [ContiguousKVCache(c.num_layers, 3, c.num_kv_heads, c.head_dim, 32, dtype=torch.float64)
              for _ in range(2)]
    for step in (ids, ids[:, :1], ids[:, 1:2]):
        torch.testing.assert_close(fast(step, cache=caches[0]), ref(step, cache=caches[1]), **TOL)


@torch.inference_mode()
def test_bfloat16_close_to_the_reference():
    ref = random_llama(dtype=torch.bfloat16)
    fast = FastLlama.from_llama(ref)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(2))
    want, got = ref(ids), fast(ids)
    assert got.dtype == torch.float32
    scale = want.abs().max()
    assert (got - want).abs().max() <= 0.05 * scale


needs_prepack = pytest.mark.skipif(not can_prepack(torch.zeros(1)), reason="no oneDNN prepacking on this CPU")


@needs_prepack
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(1, 1), (1, 16), (7, 3), (2, 300)])
def test_prepacked_linear_equals_f_linear(dtype, rows):
    """The oneDNN-prepacked product is F.linear's, for a decode row, a decode batch and prompts."""
    if dtype == torch.bfloat16 and not can_prepack(torch.zeros(1, dtype=dtype)):
        pytest.skip("no native bfloat16 on this CPU")
    g = torch.Generator().manual_seed(4)
    w = torch.randn(200, 96, generator=g).to(dtype)
    x = torch.randn(*rows, 96, generator=g).to(dtype)
    lin = PackedLinear(w)
    assert lin.prepacked
    want = F.linear(x.double(), w.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5      # relative to the largest output
    got = lin(x)
    assert got.dtype == dtype and got.shape == want.shape
    assert (got.double() - want).abs().max() <= tol * want.abs().max()
    # and the fallback computes the same product
    plain = PackedLinear(w, prepack=False)
    assert not plain.prepacked
    assert (plain(x).double() - want).abs().max() <= tol * want.abs().max()


def test_float64_never_prepacks():
    assert not can_prepack(torch.zeros(2, 2, dtype=torch.float64))
    fast = FastLlama.from_llama(random_llama())
    assert not fast.prepacked
    assert not any(m.prepacked for m in fast.modules() if isinstance(m, PackedLinear))


@needs_prepack
@torch.inference_mode()
def test_prepacked_float32_logits_close_to_the_reference():
    ref = random_llama(dtype=torch.float32)
    fast = FastLlama.from_llama(ref)
    assert fast.prepacked
    ids = torch.randint(0, 96, (3, 13), generator=torch.Generator().manual_seed(5))
    want = copy.deepcopy(ref).double()(ids)      # (the fast twin shares ref's embedding)
    got = fast(ids)
    assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()


def test_input_checks_as_the_reference():
    fast = FastLlama.from_llama(random_llama())
    with pytest.raises(ValueError, match="input_ids must lie in"):
        fast(torch.tensor([[0, 96]]))
    with pytest.raises(ValueError, match="batch, tokens"):
        fast(torch.tensor([1, 2]))


def _engine_tokens(model, prompts, n, **kw):
    llm = kvlab.LLM((model, None), block_size=4, max_model_len=128, **kw)
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in n]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_engine_greedy_equal_on_random_weights():
    ref = random_llama()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (int(L),), generator=g).tolist() for L in (3, 17, 9, 30, 1)]
    n = [12, 5, 20, 8, 15]
    assert _engine_tokens(FastLlama.from_llama(ref), prompts, n) == _engine_tokens(ref, prompts, n)


def test_engine_greedy_equal_on_the_real_model(real_model):
    model, tok = real_model
    prompts = [tok.encode(t) for t in ("The key-value cache", "Paged attention splits the cache into",
                                       "Write a haiku about memory:")]
    n = [24, 16, 20]
    llm_ref = kvlab.LLM((model, tok), max_model_len=256, enable_prefix_caching=False)
    llm_fast = kvlab.LLM((FastLlama.from_llama(model), tok), max_model_len=256, enable_prefix_caching=False)
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in n]
    want = [o.outputs[0].token_ids for o in llm_ref.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in llm_fast.generate(prompts, params, use_tqdm=False)]
    assert got == want
