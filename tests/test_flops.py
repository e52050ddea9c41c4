"""kvlab.costs.flops: weight counts match the model, FLOP counts match torch's counter and the pairs the mask
allows, closed forms match sums."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kvlab.cache.contiguous import ContiguousKVCache
from kvlab.costs import flops
from kvlab.costs.memory import MODELS, KVConfig
from kvlab.model.config import SMOLLM2_135M, LlamaConfig
from kvlab.model.llama import Llama

# two layers, one of them with a sliding window of 6 keys
WINDOWED = KVConfig("windowed", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32,
                    num_params=20_000, max_context=64, vocab_size=50, sliding_window=6, sliding_layers=1)


def _numel(model, kinds):
    return sum(m.weight.numel() for n, m in model.named_modules() if n.split(".")[-1] in kinds)


MATMULS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm", "norm")


def test_weight_split_equals_the_models_matmul_weights(tiny_model, tiny_config):
    assert flops.weight_split(tiny_config)[0] == _numel(tiny_model, MATMULS)
    assert flops.norm_weights(tiny_config) == _numel(tiny_model, NORMS)
    with torch.device("meta"):
        big = Llama(SMOLLM2_135M)
    body, head = flops.weight_split(SMOLLM2_135M)
    assert body == _numel(big, MATMULS) and head == big.lm_head.weight.numel()
    assert flops.norm_weights(SMOLLM2_135M) == _numel(big, NORMS)
    # SmolLM2-135M by hand: 30 x (2*576*576 + 2*576*192 + 3*576*1536) = 106,168,320
    assert body == 106_168_320
    # tied: the embedding matrix is the head; the rest of the parameters are the norm vectors
    assert body + head + 576 * (2 * 30 + 1) == SMOLLM2_135M.num_parameters()
    assert flops.weight_split(MODELS["smollm2-135m"]) == (body, head)
    untied = LlamaConfig(tie_word_embeddings=False)
    assert flops.weight_split(untied) == (body, head)   # a second table changes the bytes, not the FLOPs


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


@pytest.mark.parametrize("tokens,past", [(1, 0), (9, 0), (1, 5), (1, 30), (4, 3), (7, 20)])
def test_attention_flops_count_the_pairs_a_sliding_window_allows(tokens, past):
    n, w = past + tokens, WINDOWED.sliding_window
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))[past:]
    band = causal & ~torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-w)[past:]  # the last w keys
    pairs = int(causal.sum()) + int(band.sum())        # one full layer, one windowed layer
    assert flops.attention_flops(WINDOWED, tokens, past) == pairs * 4 * WINDOWED.head_dim * WINDOWED.num_heads
    assert flops.keys_seen(tokens, past, w) == int(band.sum())


@pytest.mark.parametrize("n,c,w", [(1, 0, None), (5, 0, None), (1, 9, None), (7, 3, None),
                                   (10, 0, 4), (1, 100, 16), (6, 2, 5), (3, 1, 100), (8, 8, 8)])
def test_keys_seen_matches_a_loop(n, c, w):
    brute = sum(min(c + i + 1, w) if w else c + i + 1 for i in range(n))
    assert flops.keys_seen(n, c, w) == brute


@pytest.mark.parametrize("prompt,new", [(1, 1), (1, 7), (5, 1), (6, 1), (4, 9), (16, 40), (300, 129)])
@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("config", [SMOLLM2_135M, WINDOWED], ids=["smollm2", "windowed"])
def test_generation_flops_closed_form_equals_the_sum_of_steps(config, prompt, new, use_cache):
    total = flops.Flops(0, 0, 0)
    for t in range(new):
        total = total + flops.step_flops(config, prompt, t, use_cache)
    assert flops.generation_flops(config, prompt, new, use_cache) == total


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
    assert step.linear == 2 * flops.weight_split(c)[0] and step.attention < 1e-3 * step.linear


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="new_tokens"):
        flops.forward_flops(SMOLLM2_135M, -1)
    with pytest.raises(ValueError, match="context"):
        flops.attention_flops(SMOLLM2_135M, 1, 2.5)
    with pytest.raises(ValueError, match="prompt_len"):
        flops.generation_flops(SMOLLM2_135M, 0, 4, True)
    with pytest.raises(ValueError, match="logit_rows"):
        flops.forward_flops(SMOLLM2_135M, 2, batch=2, logit_rows=5)
    with pytest.raises(ValueError, match="norms"):
        flops.weight_split(WINDOWED.replace(num_params=2 * 50 * 32 + 32 * 5))
    with pytest.raises(TypeError, match="config"):
        flops.weight_split(object())
    assert flops.generation_flops(SMOLLM2_135M, 4, 0, False).total == 0
    assert flops.sum_range(3, 5) == 12 and flops.sum_range(5, 3) == 0
    assert isinstance(LlamaConfig().num_layers, int)


def test_batch_and_logit_rows():
    c = SMOLLM2_135M
    one, four = flops.forward_flops(c, 3, 10), flops.forward_flops(c, 3, 10, batch=4)
    assert four.linear == 4 * one.linear and four.attention == 4 * one.attention
    assert four.lm_head == 4 * one.lm_head                      # one row of logits per sequence
    assert flops.forward_flops(c, 3, 10, batch=4, logit_rows=0).lm_head == 0


def test_mixture_of_experts_counts_the_active_weights():
    ds = MODELS["deepseek-v3"]
    body, head = flops.weight_split(ds)
    assert body + 2 * head + flops.norm_weights(ds) == ds.active_params == 37e9
    assert flops.linear_flops_per_token(ds) == 2 * body
