"""The quantized paged cache: equal to its contiguous twin, and the engine runs on every format."""
import copy

import pytest
import torch
from helpers import GREEDY
from helpers import random_prompts as _prompts

from kvlab import LLM, SamplingParams
from kvlab.cache.paged import AttentionMetadata
from kvlab.cache.quantized import QuantizedPagedKVCache
from kvlab.quant import KV_CACHE_DTYPES, bytes_per_block
from kvlab.quant.sim import FakeQuantKVCache

FORMATS = ["int8", "fp8", "int4", "int2"]
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
    if fmt in ("int4", "int2"):  # 23 tokens in blocks of 4: 5 sealed blocks, one partial residual
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
    if fmt in ("int4", "int2"):   # every finished sequence gave its partial block's row back
        assert llm.cache.num_residual_blocks == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_budget_buys_more_blocks(tiny_model, fmt):
    """Everything the cache holds comes out of the budget: blocks, and for int4/int2 the residual
    rows (kvlab/engine/kv_budget.py), as many as a step of at most max_num_seqs sequences and
    max_num_batched_tokens tokens can need."""
    budget = 1 << 20
    kw = dict(block_size=16, kv_cache_memory_bytes=budget, max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=128)
    auto = LLM(tiny_model, **kw)
    quant = LLM(tiny_model, **kw, kv_cache_dtype=fmt)
    c = tiny_model.config
    assert quant.bytes_per_block == bytes_per_block(c, fmt, 16)
    assert auto.kv_cache_bytes_allocated <= budget and quant.kv_cache_bytes_allocated <= budget
    rows = 128 // 16 + 2 * 4 if fmt in ("int4", "int2") else 0
    row_bytes = 2 * c.num_layers * 16 * c.num_kv_heads * c.head_dim * 4
    assert budget - quant.kv_cache_bytes_allocated < quant.bytes_per_block + 4    # no block left over
    assert quant.kv_cache_bytes_allocated >= quant.num_kv_blocks * quant.bytes_per_block + rows * row_bytes
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


def test_fp8_calibration_gives_per_layer_scales_and_key_means(tiny_model):
    from kvlab.quant.fp8 import FP8_MAX, calibrate_fp8

    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(4))
    c = tiny_model.config
    plain = calibrate_fp8(tiny_model, [ids[:1], ids[1:]], per_head=True, smooth_keys=False)
    assert len(plain.k_scales) == len(plain.v_scales) == c.num_layers and plain.k_shift is None
    assert plain.k_scales[0].shape == (c.num_kv_heads,)
    tensor = calibrate_fp8(tiny_model, [ids], per_head=False, smooth_keys=False)
    assert tensor.k_scales[0].dim() == 0 and torch.equal(tensor.k_scales[0], plain.k_scales[0].max())
    smooth = calibrate_fp8(tiny_model, [ids], per_head=True)
    rec = FakeQuantKVCache.for_model(tiny_model, 2, 20)  # what the layers really produced
    tiny_model(ids, cache=rec)
    for layer in (0, c.num_layers - 1):
        k, v = rec.k[layer].flatten(0, 1), rec.v[layer].flatten(0, 1)   # [40, Hkv, D]
        torch.testing.assert_close(k.abs().amax(dim=(0, 2)) / FP8_MAX, plain.k_scales[layer])
        torch.testing.assert_close(v.abs().amax(dim=(0, 2)) / FP8_MAX, smooth.v_scales[layer])
        torch.testing.assert_close(smooth.k_shift[layer], k.mean(0))
        torch.testing.assert_close((k - k.mean(0)).abs().amax(dim=(0, 2)) / FP8_MAX, smooth.k_scales[layer])
    with pytest.raises(ValueError, match="at least one token"):
        calibrate_fp8(tiny_model, [])


@torch.no_grad()
def test_fp8_smoothed_keys_attend_like_the_keys(tiny_model):
    """The premise of key smoothing: the paged cache stores keys minus a shift and reads them as
    stored; attention is unchanged because each query's scores all move by the same q . shift.
    Checked without quantization, in float64, on paged blocks with GQA and ragged lengths."""
    from kvlab.attention.paged_torch import paged_decode_attention

    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 6, 16, generator=g, dtype=torch.float64)
    k = torch.randn(4, 8, 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(4, 8, 2, 16, generator=g, dtype=torch.float64)
    shift = 5 * torch.randn(2, 16, generator=g, dtype=torch.float64)
    tables = torch.tensor([[2, 0], [1, -1], [3, 1]], dtype=torch.int32)
    lens = torch.tensor([13, 5, 16], dtype=torch.int32)
    a = paged_decode_attention(q, k, v, tables, lens, 0.25)
    b = paged_decode_attention(q, k - shift, v, tables, lens, 0.25)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@torch.no_grad()
def test_fp8_smoothing_shrinks_the_key_error():
    """Keys on large per-channel offsets (as in Llama-style models): rounding the deviation from
    the mean costs less than rounding the key, by about the ratio of their magnitudes."""
    from kvlab.quant import fp8

    g = torch.Generator().manual_seed(5)
    offset = 8 * torch.randn(2, 64, generator=g)
    k = offset + torch.randn(512, 2, 64, generator=g)
    shift = k.mean(0)
    err = lambda s, m: (fp8.dequantize_fp8(fp8.quantize_fp8(k, s, m), s, shift=m) - k).norm() / k.norm()  # noqa: E731
    plain = err(fp8.fp8_scale(k, per_head=True), None)
    smooth = err(fp8.fp8_scale(k - shift, per_head=True), shift)
    assert smooth < plain / 4, (float(plain), float(smooth))
    assert smooth < 2 ** -4 * (k - shift).norm() / k.norm()      # half a spacing of the deviation


@torch.no_grad()
def test_fp8_smoothed_decode_equals_fake_quant_twin(tiny_model):
    """With calibrated scales and key shifts, the paged cache (torch path) == its contiguous twin."""
    from kvlab.quant.fp8 import calibrate_fp8

    model = copy.deepcopy(tiny_model).double()
    c = model.config
    ids = torch.randint(0, c.vocab_size, (1, 12), generator=torch.Generator().manual_seed(6))
    cal = calibrate_fp8(model, [ids])
    paged = QuantizedPagedKVCache(c.num_layers, 8, 4, c.num_kv_heads, c.head_dim, dtype=torch.float64,
                                  kv_cache_dtype="fp8", fp8_calibration=cal)
    sim = FakeQuantKVCache.for_model(model, 1, 12, "fp8", fp8_calibration=cal)
    table = torch.tensor([[5, 2, 7]], dtype=torch.int32)
    for t in range(12):
        paged.set_metadata(AttentionMetadata(
            slot_mapping=torch.tensor([int(table[0, t // 4]) * 4 + t % 4]),
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
            context_lens=torch.tensor([t + 1], dtype=torch.int32), block_tables=table, is_decode=True))
        a = model(ids[:, t:t + 1], positions=torch.tensor([[t]]), cache=paged)
        b = model(ids[:, t:t + 1], cache=sim)
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_llm_takes_fp8_calibration(tiny_model):
    from kvlab.quant.fp8 import calibrate_fp8

    cal = calibrate_fp8(tiny_model, [torch.tensor([_prompts([24])[0]])])
    prompts = _prompts([7, 19], seed=2)
    sp = SamplingParams(max_tokens=6, **GREEDY)
    llm = LLM(tiny_model, block_size=4, num_kv_blocks=32, max_model_len=64, kv_cache_dtype="fp8",
              fp8_calibration=cal)
    assert all(torch.equal(a, b) for a, b in zip(llm.cache.k_shift, cal.k_shift))
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert llm.block_manager.num_free_blocks == llm.num_kv_blocks
    with pytest.raises(ValueError, match="fp8_calibration is only for kv_cache_dtype='fp8'"):
        LLM(tiny_model, block_size=4, num_kv_blocks=8, max_model_len=32, kv_cache_dtype="int8",
            fp8_calibration=cal)


def test_int4_default_block_size_reaches_3_2x(tiny_model):
    """The engine's default block size per format: int4's key scales over blocks of 32 tokens give
    3.2x bfloat16's tokens per byte at head_dim 64 (the course model), 2.9x with blocks of 16."""
    from types import SimpleNamespace

    llm = LLM(tiny_model, num_kv_blocks=4, max_model_len=64, kv_cache_dtype="int4")
    assert llm.block_size == 32 and LLM(tiny_model, num_kv_blocks=4, max_model_len=64).block_size == 16
    smol = SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64)
    gain = {bs: bytes_per_block(smol, "auto", bs) / bytes_per_block(smol, "int4", bs) for bs in (16, 32)}
    assert gain[32] >= 3.2 > gain[16] > 2.9


def test_int4_residual_pool_shrinks_and_keeps_rows_in_place():
    """Grow to what a step needs, then shrink to 2x the rows in use (not below the initial size),
    the rows in use moved to the front with their contents; discard gives a row back."""
    from kvlab.quant.residual import Int4Residual

    BS = 4
    res = Int4Residual.create(1, 64, BS, 1, 8, rows=2)
    slots = torch.arange(40 * BS)                        # one step writes blocks 0..39 whole
    res.open(slots)
    assert res.rows_in_use == 40 and res.k_res[0].shape[0] >= 40
    res.open(torch.tensor([50 * BS, 51 * BS + 1]))       # two partial blocks
    for b in (50, 51):
        res.k_res[0][int(res.res_slot[b])] = b           # mark their contents
    res.close(slots)                                     # blocks 0..39 sealed: 2 rows left
    assert res.rows_in_use == 2 and res.k_res[0].shape[0] == 4
    assert sorted(res.res_slot[[50, 51]].tolist()) == [0, 1]
    for b in (50, 51):
        assert (res.k_res[0][int(res.res_slot[b])] == b).all()
    res.discard([50, 7])                                 # 7 has no row: nothing to do
    assert res.rows_in_use == 1 and int(res.res_slot[50]) == -1
    assert res.k_res[0].shape[0] == 2                    # 1 of 4 in use: down to the initial 2
    assert int(res.res_slot[51]) == 0 and (res.k_res[0][0] == 51).all()
    assert res.nbytes == 2 * 2 * BS * 8 * 4 + 64 * 4     # K and V, 2 rows of float32; the row index


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_int4_engine_gives_residual_rows_back(tiny_model, prefix_caching):
    """Finished requests' partial blocks give their rows back; after a burst of long prompts the
    pool shrinks again, so the memory outside the block budget tracks the running sequences."""
    model = copy.deepcopy(tiny_model).double()
    llm = LLM(model, block_size=4, num_kv_blocks=96, max_model_len=128, kv_cache_dtype="int4",
              enable_prefix_caching=prefix_caching)
    res, initial, peak = llm.cache.residual, llm.cache.residual_bytes, []
    open_rows = res.open
    res.open = lambda slots: (open_rows(slots), peak.append(res.rows_in_use))  # rows a step needs
    llm.generate(_prompts([61, 58, 47, 70], seed=3), SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert peak[0] == 16 + 15 + 12 + 18                   # the burst's prefill: a row per block
    assert peak[1:] == [4, 4]                             # then one partial block per sequence
    assert llm.cache.num_residual_blocks == 0 and llm.cache.residual_bytes == initial
    outs = llm.generate(_prompts([5, 9], seed=4), SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert llm.cache.num_residual_blocks == 0
    assert llm.block_manager.num_free_blocks == llm.num_kv_blocks
