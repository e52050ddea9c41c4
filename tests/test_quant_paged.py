"""The quantized paged cache: equal to its contiguous twin, and the engine runs on every format."""
import copy

import pytest
import torch

from kvlab import LLM, SamplingParams
from kvlab.cache.paged import AttentionMetadata
from kvlab.quant import KV_CACHE_DTYPES, bytes_per_block
from kvlab.quant.paged import QuantizedPagedKVCache
from kvlab.quant.sim import FakeQuantKVCache

FORMATS = ["int8", "fp8", "int4"]
GREEDY = dict(temperature=0, ignore_eos=True)


def _prompts(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_equals_fake_quant_twin(tiny_model, fmt):
    """Token by token through the paged blocks (block ids shuffled) == the contiguous twin.

    float64 so that the two attention paths cannot round a value across a quantization boundary."""
    tiny_model = copy.deepcopy(tiny_model).double()
    c = tiny_model.config
    BS, T = 4, 23
    ids = torch.randint(0, c.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    paged = QuantizedPagedKVCache(c.num_layers, 16, BS, c.num_kv_heads, c.head_dim,
                                  dtype=torch.float64, kv_cache_dtype=fmt)
    sim = FakeQuantKVCache.for_model(tiny_model, 1, T, fmt, group_size=BS)
    table = torch.tensor([[9, 3, 14, 0, 7, 1]], dtype=torch.int32)
    for t in range(T):
        paged.set_metadata(AttentionMetadata(
            slot_mapping=torch.tensor([int(table[0, t // BS]) * BS + t % BS]),
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
            context_lens=torch.tensor([t + 1], dtype=torch.int32), block_tables=table, is_decode=True))
        a = tiny_model(ids[:, t:t + 1], positions=torch.tensor([[t]]), cache=paged)
        b = tiny_model(ids[:, t:t + 1], cache=sim)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    if fmt == "int4":  # 23 tokens in blocks of 4: 5 sealed blocks, one partial residual
        assert paged.num_residual_blocks == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_finishes_every_request_and_frees_every_block(tiny_model, fmt):
    model = copy.deepcopy(tiny_model).double()
    prompts = _prompts([3, 17, 40, 1, 9, 33])
    for num_blocks in (64, 16):  # 16 blocks of 4 forces preemptions
        llm = LLM(model, block_size=4, num_kv_blocks=num_blocks, max_model_len=128, kv_cache_dtype=fmt)
        outs = llm.generate(prompts, SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)
        assert all(o.finished and len(o.outputs[0].token_ids) == 10 for o in outs)
        assert llm.block_manager.num_free_blocks == llm.num_kv_blocks
        assert all(b.ref_count == 0 for b in llm.block_manager.blocks)
        assert not llm.has_unfinished_requests()
    if fmt == "int4":
        assert llm.cache.num_residual_blocks <= llm.num_kv_blocks


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_budget_buys_more_blocks(tiny_model, fmt):
    budget = 1 << 20
    auto = LLM(tiny_model, block_size=16, kv_cache_memory_bytes=budget, max_model_len=128)
    quant = LLM(tiny_model, block_size=16, kv_cache_memory_bytes=budget, max_model_len=128,
                kv_cache_dtype=fmt)
    c = tiny_model.config
    assert quant.bytes_per_block == bytes_per_block(c, fmt, 16)
    assert quant.num_kv_blocks == budget // bytes_per_block(c, fmt, 16)
    assert quant.num_kv_blocks > 1.9 * auto.num_kv_blocks  # float32 model: "auto" is 4 bytes a number


def test_bad_kv_cache_dtype(tiny_config):
    c = tiny_config
    with pytest.raises(ValueError) as e:
        QuantizedPagedKVCache(c.num_layers, 4, 4, c.num_kv_heads, c.head_dim, kv_cache_dtype="int3")
    assert all(repr(n) in str(e.value) for n in KV_CACHE_DTYPES)
    with pytest.raises(ValueError, match="int4 needs"):
        QuantizedPagedKVCache(1, 4, 4, 1, 48, kv_cache_dtype="int4")


def test_real_model_int8_greedy_mostly_agrees_with_auto(real_model):
    model, tok = real_model
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at",
               "The three primary colors are"]
    sp = SamplingParams(max_tokens=24, **GREEDY)
    runs = {}
    for fmt in ("auto", "int8"):
        llm = LLM((model, tok), block_size=16, num_kv_blocks=32, max_model_len=128, kv_cache_dtype=fmt)
        runs[fmt] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    same = sum(a == b for x, y in zip(runs["auto"], runs["int8"]) for a, b in zip(x, y))
    rate = same / sum(map(len, runs["auto"]))
    print(f"int8 vs auto greedy agreement: {rate:.3f}")
    assert rate >= 0.75


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["auto", *FORMATS])
def test_chunked_prefill_equals_token_by_token(tiny_model, fmt):
    """The accuracy benchmark's premise: chunks through the twin == decoding one token at a time."""
    model = copy.deepcopy(tiny_model).double()
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    mk = lambda: FakeQuantKVCache.for_model(model, 2, 30, fmt, group_size=8)  # noqa: E731
    c = mk()
    one = torch.cat([model(ids[:, t:t + 1], cache=c) for t in range(30)], dim=1)
    c = mk()
    chunks = torch.cat([model(ids[:, t:t + 7], cache=c) for t in range(0, 30, 7)], dim=1)
    torch.testing.assert_close(chunks, one, atol=1e-9, rtol=1e-9)


def test_fp8_calibration_gives_per_layer_scales(tiny_model):
    from kvlab.quant.fp8 import FP8_MAX, calibrate_fp8_scales

    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(4))
    c = tiny_model.config
    ks, vs = calibrate_fp8_scales(tiny_model, [ids], per_head=True)
    assert len(ks) == len(vs) == c.num_layers and ks[0].shape == (c.num_kv_heads,)
    kt, _ = calibrate_fp8_scales(tiny_model, [ids], per_head=False)
    assert kt[0].dim() == 0 and torch.equal(kt[0], ks[0].max())
    rec = FakeQuantKVCache.for_model(tiny_model, 1, 20)  # the largest key really maps to 448
    tiny_model(ids, cache=rec)
    amax = rec.k[0][0].abs().amax(dim=(0, 2))
    torch.testing.assert_close(amax / FP8_MAX, ks[0].detach())
