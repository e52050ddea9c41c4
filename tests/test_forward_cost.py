"""forward_cost: bytes and roofline floors against hand counts; its FLOPs are exactly kvlab.costs.flops' count."""
import math

import pytest

from kvlab.costs.flops import forward_flops, norm_weights, weight_split
from kvlab.costs.forward_cost import ForwardCost, forward_cost, generation_cost
from kvlab.costs.memory import MODELS, KVConfig, kv_bytes_per_token
from kvlab.costs.roofline import GPUS, Machine
from kvlab.model.config import SMOLLM2_135M

TOY = KVConfig("toy", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32,
               num_params=10_000, max_context=64, vocab_size=50)


def test_toy_prefill_by_hand():
    body, head = weight_split(TOY)
    norms = 32 * (2 * 2 + 1)                                     # RMSNorm vectors: read, not matmuls
    assert norm_weights(TOY) == norms
    assert head == 50 * 32 and body == 10_000 - 2 * 50 * 32 - norms   # untied: embedding and head both out
    cost = forward_cost(TOY, 5, 0, 1, weight_dtype_bytes=2, kv_dtype_bytes=2)
    attn = 4 * 4 * 8 * 2 * (1 + 2 + 3 + 4 + 5)                 # 4 Hq D per key, 2 layers, causal
    assert cost.flops == 2 * body * 5 + 2 * head * 1 + attn
    assert cost.weight_bytes == (10_000 - 50 * 32) * 2          # every weight but the input table
    assert cost.kv_read_bytes == 0                               # nothing cached yet
    assert cost.kv_write_bytes == 5 * kv_bytes_per_token(TOY, 2)


def test_toy_decode_by_hand():
    body, head = weight_split(TOY)
    cost = forward_cost(TOY, 1, 10, batch=3, weight_dtype_bytes=4, kv_dtype_bytes=4)
    assert cost.flops == 3 * (2 * body + 2 * head + 4 * 4 * 8 * 2 * 11)
    assert cost.weight_bytes == (body + norm_weights(TOY) + head) * 4   # read once for the whole batch
    assert cost.kv_read_bytes == 3 * 10 * kv_bytes_per_token(TOY, 4)
    assert cost.kv_write_bytes == 3 * kv_bytes_per_token(TOY, 4)


def test_smollm2_split_matches_the_model():
    body, head = weight_split(SMOLLM2_135M)
    c = SMOLLM2_135M
    assert head == c.vocab_size * c.hidden_size
    assert body + norm_weights(c) + head == c.num_parameters()  # tied: the table counted once
    assert weight_split(MODELS["smollm2-135m"]) == (body, head)
    assert forward_cost(c, 1).weight_bytes == 2 * c.num_parameters()


@pytest.mark.parametrize("model", ["smollm2-135m", "llama-3.1-8b", "mistral-7b", "gemma-2-9b", "deepseek-v3"])
@pytest.mark.parametrize("tokens,context,batch", [(1, 0, 1), (10, 0, 1), (1, 5000, 8), (7, 33, 3)])
def test_flops_are_kvlab_flops(model, tokens, context, batch):
    """One FLOP convention in the package: forward_cost reports kvlab.costs.flops' count (matmuls only)."""
    assert forward_cost(model, tokens, context, batch).flops == forward_flops(model, tokens, context, batch).total


def test_sliding_window_caps_keys_and_reads():
    m = MODELS["mistral-7b"]
    far, near = forward_cost(m, 1, 10_000), forward_cost(m, 1, 4096)
    assert far.kv_read_bytes == near.kv_read_bytes == 4096 * kv_bytes_per_token(m)
    assert far.flops == near.flops
    assert forward_cost(MODELS["llama-3.1-8b"], 1, 10_000).flops > forward_cost(
        MODELS["llama-3.1-8b"], 1, 4096).flops


def test_prefill_compute_bound_decode_bandwidth_bound_on_h100():
    h100 = GPUS["H100 SXM"]
    m = MODELS["llama-2-70b"]
    prefill, decode = forward_cost(m, 2000), forward_cost(m, 1, 2000)
    assert prefill.intensity > h100.ridge > 100 * decode.intensity
    assert decode.intensity == pytest.approx(1.0, rel=0.05)     # 2 FLOPs per 2-byte weight
    # decode floor = weights / bandwidth: 137.7 GB / 3.35 TB/s = 41 ms
    assert decode.floor_seconds(h100) == pytest.approx(decode.bytes / 3.35e12)
    assert 0.040 < decode.floor_seconds(h100) < 0.042
    assert prefill.floor_seconds(h100) == pytest.approx(prefill.flops / 989e12)


def test_generation_cost_lengths_and_growth():
    m = MODELS["llama-3.1-8b"]
    cached = generation_cost(m, 100, 5)
    naive = generation_cost(m, 100, 5, use_cache=False)
    assert len(cached) == len(naive) == 5
    assert cached[0].flops == naive[0].flops                     # the first pass is the same work
    assert naive[0].kv_write_bytes == 0 < cached[0].kv_write_bytes
    assert all(n.flops > c.flops for n, c in zip(naive[1:], cached[1:]))
    assert naive[4].flops > naive[3].flops
    total = sum(cached[1:], cached[0])
    assert isinstance(total, ForwardCost) and total.flops == sum(c.flops for c in cached)


def test_floor_is_the_max_of_the_two_roofs():
    c = ForwardCost(flops=100.0, weight_bytes=10.0, kv_read_bytes=0.0, kv_write_bytes=0.0)
    assert c.floor_seconds(Machine("m", peak_flops=10.0, bandwidth=100.0)) == 10.0
    assert c.floor_seconds(Machine("m", peak_flops=1000.0, bandwidth=1.0)) == 10.0
    assert c.floor_seconds(Machine("m", peak_flops=1000.0, bandwidth=100.0)) == 0.1


def test_bad_input_raises():
    with pytest.raises(ValueError, match="new_tokens"):
        forward_cost(TOY, 0)
    with pytest.raises(ValueError, match="context"):
        forward_cost(TOY, 1, -1)
    with pytest.raises(ValueError, match="logit_rows"):
        forward_cost(TOY, 2, logit_rows=3)
    with pytest.raises(ValueError, match="context must be 0"):
        forward_cost(TOY, 1, 5, use_cache=False)
    with pytest.raises(ValueError, match="embeddings"):
        weight_split(TOY.replace(num_params=100))
    with pytest.raises(ValueError, match="active_params"):
        TOY.replace(active_params=1e9)


def test_critical_batch():
    from kvlab.costs.forward_cost import critical_batch
    assert critical_batch(GPUS["H100 SXM"]) == math.ceil(989e12 / 3.35e12) == 296
    assert critical_batch(GPUS["H200"], 1) == math.ceil(989e12 / 4.8e12 / 2) == 104
    assert critical_batch(Machine("cpu", peak_flops=5e10, bandwidth=3e10), 4) == 4   # ridge 1.67
    assert critical_batch(Machine("slow", peak_flops=1.0, bandwidth=100.0)) == 1
    with pytest.raises(ValueError, match="weight_dtype_bytes"):
        critical_batch(GPUS["H200"], 0)


def test_mixture_of_experts_reads_the_active_weights_at_batch_1():
    ds = MODELS["deepseek-v3"]
    _, head = weight_split(ds)
    assert forward_cost(ds, 1, 100).weight_bytes == (37e9 - head) * 2   # untied: the input table is a lookup
