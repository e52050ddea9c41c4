"""kvlab.flops: weight counts match the model, FLOP counts match torch's counter, closed forms match sums."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kvlab import flops
from kvlab.cache.contiguous import ContiguousKVCache
from kvlab.model.config import SMOLLM2_135M, LlamaConfig
from kvlab.model.llama import Llama


def _linear_numel(model):
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return sum(m.weight.numel() for n, m in model.named_modules() if n.split(".")[-1] in names)


def test_linear_weights_equal_the_models_matmul_weights(tiny_model, tiny_config):
    assert flops.linear_weights(tiny_config) == _linear_numel(tiny_model)
    with torch.device("meta"):
        big = Llama(SMOLLM2_135M)
    assert flops.linear_weights(SMOLLM2_135M) == _linear_numel(big)
    # SmolLM2-135M by hand: 30 x (2*576*576 + 2*576*192 + 3*576*1536) = 106,168,320
    assert flops.linear_weights(SMOLLM2_135M) == 106_168_320
    emb_and_norms = SMOLLM2_135M.vocab_size * 576 + 576 * (2 * 30 + 1)
    assert flops.linear_weights(SMOLLM2_135M) + emb_and_norms == SMOLLM2_135M.num_parameters()


@pytest.mark.parametrize("tokens,past", [(10, 0), (1, 10), (3, 7)])
def test_matmul_flops_equal_torchs_flop_counter(tiny_model, tiny_config, tokens, past):
    """torch's FlopCounterMode counts the matmuls (on CPU it does not see inside SDPA)."""
    torch.manual_seed(0)
    kv = ContiguousKVCache.for_model(tiny_model, 1, 64)
    with torch.inference_mode():
        if past:
            tiny_model(torch.randint(0, 256, (1, past)), cache=kv)
        counter = FlopCounterMode(display=False)
        with counter:
            tiny_model(torch.randint(0, 256, (1, tokens)), cache=kv, last_only=True)
    f = flops.forward_flops(tiny_config, tokens, past)
    assert counter.get_total_flops() == f.linear + f.lm_head


@pytest.mark.parametrize("tokens,past", [(1, 0), (5, 0), (1, 9), (4, 6)])
def test_attention_flops_count_the_pairs_the_causal_mask_allows(tiny_config, tokens, past):
    n = past + tokens
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))[past:]  # rows of the new queries
    c = tiny_config
    per_pair = 2 * 2 * c.head_dim  # q.k and weight*v, 2 FLOPs per multiply-add
    assert flops.attention_flops(c, tokens, past) == int(allowed.sum()) * per_pair * c.num_heads * c.num_layers


@pytest.mark.parametrize("prompt,new", [(1, 1), (1, 7), (5, 1), (16, 40), (300, 129)])
@pytest.mark.parametrize("use_cache", [False, True])
def test_generation_flops_closed_form_equals_the_sum_of_steps(prompt, new, use_cache):
    total = flops.Flops(0, 0, 0)
    for t in range(new):
        total = total + flops.step_flops(SMOLLM2_135M, prompt, t, use_cache)
    assert flops.generation_flops(SMOLLM2_135M, prompt, new, use_cache) == total


def test_naive_steps_are_whole_forwards_and_cached_steps_one_token():
    c = SMOLLM2_135M
    assert flops.step_flops(c, 8, 5, use_cache=False) == flops.forward_flops(c, 13, 0)
    assert flops.step_flops(c, 8, 0, use_cache=True) == flops.forward_flops(c, 8, 0)
    assert flops.step_flops(c, 8, 5, use_cache=True) == flops.forward_flops(c, 1, 12)
    # the first step is the same work with or without a cache
    assert flops.step_flops(c, 8, 0, True) == flops.step_flops(c, 8, 0, False)


def test_growth_naive_quadratic_cached_linear_in_the_linear_layers():
    c = SMOLLM2_135M
    naive = [flops.generation_flops(c, 1, n, False).linear for n in (1000, 2000)]
    cached = [flops.generation_flops(c, 1, n, True).linear for n in (1000, 2000)]
    assert naive[1] / naive[0] == pytest.approx(4, rel=2e-3)
    assert cached[1] / cached[0] == pytest.approx(2, rel=2e-3)
    # Kaplan et al.'s 2N per token: a cached decode step at a short context is about 2N + lm_head
    step = flops.step_flops(c, 1, 1, True)
    assert step.linear == 2 * flops.linear_weights(c) and step.attention < 1e-3 * step.linear


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="new_tokens"):
        flops.forward_flops(SMOLLM2_135M, -1)
    with pytest.raises(ValueError, match="past_tokens"):
        flops.attention_flops(SMOLLM2_135M, 1, 2.5)
    with pytest.raises(ValueError, match="prompt_len"):
        flops.generation_flops(SMOLLM2_135M, 0, 4, True)
    with pytest.raises(ValueError, match="config.hidden_size"):
        flops.linear_weights(object())
    assert flops.generation_flops(SMOLLM2_135M, 4, 0, False).total == 0
    assert flops.sum_range(3, 5) == 12 and flops.sum_range(5, 3) == 0
    assert isinstance(LlamaConfig().num_layers, int)


@pytest.mark.parametrize("tokens,past", [(1, 0), (10, 0), (1, 100), (7, 33)])
def test_agrees_with_forward_cost_up_to_the_norm_weights(tokens, past):
    """kvlab.forward_cost counts from the parameter total, so it also charges 2 FLOPs per token to
    each RMSNorm weight (h per norm, 2 per layer + the final one); otherwise the two counts agree."""
    from kvlab.forward_cost import forward_cost

    c = SMOLLM2_135M
    norm_weights = c.hidden_size * (2 * c.num_layers + 1)
    assert forward_cost(c, tokens, past).flops - flops.forward_flops(c, tokens, past).total == \
        2 * norm_weights * tokens
