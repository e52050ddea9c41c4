"""keep_sink_token: each sequence's first token kept in full precision beside the quantized paged
cache (kvlab/quant/sink.py), on the PyTorch path: equal to the contiguous twin with keep_first=1,
rows follow the blocks through prefix caching, eviction, preemption and abort, and nothing leaks.
(tests/test_kernels_quant_engine.py checks the Triton path against this one.)"""
import copy

import pytest
import torch
from helpers import GREEDY
from helpers import random_prompts as _prompts

from kvlab import LLM, SamplingParams
from kvlab.cache.paged import AttentionMetadata
from kvlab.cache.quantized import QuantizedPagedKVCache
from kvlab.quant import fp8
from kvlab.quant.sim import FakeQuantKVCache
from kvlab.quant.sink import sink_blocks

FORMATS = ["int8", "fp8", "int4", "int2"]
def _calibration(c, smooth):
    """fp8 with per-head scales and, if `smooth`, a random key shift per layer (stored minus it)."""
    g = torch.Generator().manual_seed(5)
    scales = [torch.rand(c.num_kv_heads, generator=g) * 0.02 + 0.01 for _ in range(c.num_layers)]
    shift = [torch.randn(c.num_kv_heads, c.head_dim, generator=g) for _ in range(c.num_layers)] if smooth else None
    return fp8.Fp8Calibration(scales, scales, shift)


@torch.no_grad()
@pytest.mark.parametrize("fmt", FORMATS + ["fp8 smoothed"])
def test_decode_equals_twin_with_first_token_kept(tiny_model, fmt):
    """Token by token through shuffled blocks == FakeQuantKVCache(keep_first=1), float64; and the
    kept token matters: without it the outputs differ."""
    model = copy.deepcopy(tiny_model).double()
    c = model.config
    kv, kw = fmt.split()[0], {}
    if kv == "fp8":
        kw["fp8_calibration"] = _calibration(c, smooth=fmt.endswith("smoothed"))
    BS, T = 4, 14
    ids = torch.randint(0, c.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    table = torch.tensor([[9, 3, 14, 0]], dtype=torch.int32)
    runs = {}
    for keep in (True, False):
        paged = QuantizedPagedKVCache(c.num_layers, 16, BS, c.num_kv_heads, c.head_dim, dtype=torch.float64,
                                      kv_cache_dtype=kv, keep_sink_token=keep, **kw)
        sim = FakeQuantKVCache.for_model(model, 1, T, kv, group_size=BS, keep_first=int(keep), **kw)
        outs = []
        for t in range(T):
            paged.set_metadata(AttentionMetadata(
                slot_mapping=torch.tensor([int(table[0, t // BS]) * BS + t % BS]),
                query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
                context_lens=torch.tensor([t + 1], dtype=torch.int32), block_tables=table, is_decode=True))
            a = model(ids[:, t:t + 1], positions=torch.tensor([[t]]), cache=paged)
            torch.testing.assert_close(a, model(ids[:, t:t + 1], cache=sim), atol=1e-6, rtol=1e-6)
            outs.append(a)
        runs[keep] = torch.cat(outs, 1)
        assert (paged.sink_bytes > 0) == keep
        if keep:   # one row, for block 9 (the first block); no other block has one
            assert paged.sinks.rows_in_use == 1 and int(paged.sinks.res_slot[9]) >= 0
    assert not torch.allclose(runs[True], runs[False], atol=1e-6)


def test_sink_blocks_are_first_blocks_written_at_position_0():
    tables = torch.tensor([[5, 2, -1], [7, -1, -1], [3, 8, 1]], dtype=torch.int32)
    BS = 4
    # seq 0 prefills positions 0..5 (blocks 5, 2), seq 1 decodes position 2, seq 2 a chunk at 4..9
    slots = torch.tensor([20, 21, 22, 23, 8, 9, 30, 32, 33, 34, 35, 4, 5, -1])
    assert sink_blocks(tables, slots, BS).tolist() == [5]   # 8 and 32 are offset 0 of later blocks


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_rows_follow_blocks_and_nothing_leaks(tiny_model, fmt):
    """Prompts of 1 to 40 tokens, pools of 64 and 16 blocks (preemptions), and two requests that
    share a prompt's first blocks: every request finishes; each block holding a sink row is a
    block in use or a cached block, and every cached first block holds one (a hit finds its
    sink); with prefix caching off, or after a reset of the prefix cache, no row stays. For the
    per-token formats a cached block holds the bytes a recompute would write, so greedy tokens
    equal those without prefix caching (int4/int2 prefill reads its own blocks unquantized, a
    cached block quantized: they may differ, with or without sinks)."""
    model = copy.deepcopy(tiny_model).double()
    prompts = _prompts([3, 17, 40, 1, 9, 33])
    prompts.append(prompts[2][:24] + [7, 7, 7])          # a prefix-cache hit on 6 blocks
    params = SamplingParams(max_tokens=10, **GREEDY)
    tokens = {}
    for caching in (True, False):
        for num_blocks in (64, 16):
            llm = LLM(model, block_size=4, num_kv_blocks=num_blocks, max_model_len=128, kv_cache_dtype=fmt,
                      keep_sink_token=True, enable_prefix_caching=caching)
            outs = llm.generate(prompts, params, use_tqdm=False)
            assert all(o.finished and len(o.outputs[0].token_ids) == 10 for o in outs)
            tokens[caching, num_blocks] = [o.outputs[0].token_ids for o in outs]
            bm, sinks = llm.block_manager, llm.cache.sinks
            held = (sinks.res_slot >= 0).nonzero().flatten().tolist()
            assert len(held) == sinks.rows_in_use
            assert all(bm.blocks[b].ref_count > 0 or bm.blocks[b].block_hash is not None for b in held)
            assert bm.num_free_blocks == llm.num_kv_blocks
            if not caching:
                assert sinks.rows_in_use == 0
            else:
                assert 0 < sinks.rows_in_use <= len(prompts)   # at most one cached first block each
                firsts = [b.block_id for b in bm.blocks if b.block_hash is not None and b.parent is None]
                assert firsts and all(int(sinks.res_slot[b]) >= 0 for b in firsts)
                assert llm.reset_prefix_cache() and sinks.rows_in_use == 0
            if fmt in ("int4", "int2"):
                assert llm.cache.num_residual_blocks == 0
    if fmt in ("int8", "fp8"):
        assert tokens[True, 64] == tokens[False, 64]
        assert tokens[True, 16] == tokens[False, 16]


def test_abort_gives_the_row_back(tiny_model):
    llm = LLM(tiny_model, block_size=4, num_kv_blocks=32, max_model_len=64, kv_cache_dtype="int4",
              keep_sink_token=True, enable_prefix_caching=False)
    rid = llm.add_request(_prompts([6])[0], SamplingParams(max_tokens=20, **GREEDY))
    llm.step()
    assert llm.cache.sinks.rows_in_use == 1
    llm.abort_request(rid)             # the blocks are free at once; the cache hears of it when
    assert llm.block_manager.num_free_blocks == 32 and llm.cache.sinks.rows_in_use == 1
    out, = llm.step()                  # the next step starts (before any row of it opens)
    assert out.outputs[0].finish_reason == "abort"
    assert llm.cache.sinks.rows_in_use == 0


def test_bad_keep_sink_token(tiny_model, tiny_config):
    c = tiny_config
    with pytest.raises(ValueError, match="keep_sink_token .* needs kv_cache_dtype int8, fp8, int4 or int2"):
        LLM(tiny_model, block_size=4, num_kv_blocks=8, max_model_len=32, keep_sink_token=True)
    with pytest.raises(ValueError, match="keep_sink_token with int4 needs block_size >= 2"):
        QuantizedPagedKVCache(1, 4, 1, c.num_kv_heads, c.head_dim, kv_cache_dtype="int4", keep_sink_token=True)
    with pytest.raises(ValueError, match="keep_sink_token must be True or False"):
        QuantizedPagedKVCache(1, 4, 4, c.num_kv_heads, c.head_dim, kv_cache_dtype="int8", keep_sink_token=1)
