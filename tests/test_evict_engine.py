"""KV eviction in the engine (kvlab.LLM(kv_budget_tokens=..., kv_eviction=...)): the same tokens as
the accuracy twin (kvlab.evict.twin, block-lazy, original positions) in float64, the block bound
while decoding, no leak, prefix-cache blocks never written, every format and backend it allows,
and the combinations it refuses."""
import math

import pytest
import torch
from helpers import assert_all_free, random_llama, random_prompts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvlab
from kvlab.cache.compaction import KVCompactor, table_slots
from kvlab.cache.paged import PagedKVCache
from kvlab.cache.quantized import QuantizedPagedKVCache
from kvlab.engine.kv_eviction import Compaction, max_blocks_per_sequence
from kvlab.evict import EvictingKVCache, EvictionConfig

GREEDY = kvlab.SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
POLICIES = {"window": {}, "streaming": dict(num_sink_tokens=2), "h2o": {},
            "snapkv": dict(kv_eviction_window=4)}


@pytest.fixture(scope="module")
def model():
    return random_llama(seed=1)


def prompts_for(lengths, seed=3):
    return random_prompts(lengths, seed=seed, vocab=96)


def config_for(policy, budget, block_size, kw):
    return EvictionConfig(policy, budget, num_sinks=kw.get("num_sink_tokens", 4),
                          recent=kw.get("kv_eviction_window"), block_size=block_size)


def twin_greedy(model, prompt, cfg, n, chunk=None):
    """Greedy tokens with the twin: the prompt in one forward (or chunks of `chunk`), then one by one."""
    cache = EvictingKVCache.for_model(model, 1, cfg, rope_positions="original")
    step = chunk or len(prompt)
    for a in range(0, len(prompt), step):
        logits = model(torch.tensor([prompt[a:a + step]]), cache=cache)
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache=cache)
    return out


def engine(model, policy, budget=16, block_size=4, **kw):
    kw = POLICIES[policy] | kw
    kw.setdefault("enable_prefix_caching", policy in ("window", "streaming"))
    return kvlab.LLM(model=model, block_size=block_size, kv_budget_tokens=budget, kv_eviction=policy,
                     num_kv_blocks=kw.pop("num_kv_blocks", 200), **kw)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


# ---- the same tokens as the twin ---------------------------------------------------------------
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("block_size", [4, 8])
def test_engine_equals_the_twin(model, policy, block_size):
    """Four sequences at once (one prompt under the budget), float64: the engine's tokens equal the
    twin's one sequence at a time, and differ from the full cache's (the budget bites)."""
    llm = engine(model, policy, budget=16, block_size=block_size)
    prompts = prompts_for([37, 12, 25, 50])
    got = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    cfg = config_for(policy, 16, block_size, POLICIES[policy])
    assert got == [twin_greedy(model, p, cfg, 30) for p in prompts]
    full = tokens(kvlab.LLM(model=model, block_size=block_size, num_kv_blocks=200)
                  .generate(prompts, GREEDY, use_tqdm=False))
    assert sum(g != f for g, f in zip(got, full)) >= 3
    assert llm.scheduler.evictor.num_cuts > 0
    assert_all_free(llm)


@pytest.mark.parametrize("policy", ["window", "streaming", "h2o"])
def test_chunked_prefill_equals_the_twin_in_the_same_chunks(model, policy):
    """A cut between chunks: the next chunk attends over the kept entries plus itself, as the twin
    fed the same chunks does."""
    llm = engine(model, policy, enable_chunked_prefill=True, max_num_batched_tokens=8,
                 max_num_seqs=1, max_model_len=128)
    prompt = prompts_for([45])[0]
    got = tokens(llm.generate([prompt], GREEDY, use_tqdm=False))[0]
    assert got == twin_greedy(model, prompt, config_for(policy, 16, 4, POLICIES[policy]), 30, chunk=8)


def test_snapkv_chunked_equals_unchunked(model):
    """snapkv keeps the whole prompt until its end and scores the last queries in whichever chunk
    they fall, so chunking changes nothing."""
    prompts = prompts_for([45, 30])
    whole = tokens(engine(model, "snapkv").generate(prompts, GREEDY, use_tqdm=False))
    chunked = engine(model, "snapkv", enable_chunked_prefill=True, max_num_batched_tokens=8, max_num_seqs=2,
                     max_model_len=128)
    assert tokens(chunked.generate(prompts, GREEDY, use_tqdm=False)) == whole


@pytest.mark.parametrize("backend", ["cpu"])
@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_other_backends_equal_the_twin(model, policy, backend):
    llm = engine(model, policy, attention_backend=backend)
    prompts = prompts_for([33, 21])
    cfg = config_for(policy, 16, 4, POLICIES[policy])
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == [twin_greedy(model, p, cfg, 30) for p in prompts]


def test_no_budget_leaves_the_engine_unchanged(model):
    prompts = prompts_for([37, 12])
    plain = kvlab.LLM(model=model, block_size=4, num_kv_blocks=64)
    none = kvlab.LLM(model=model, block_size=4, num_kv_blocks=64, kv_budget_tokens=None)
    assert none.cache.compactor is None and none.scheduler.evictor is None
    assert none.kv_cache_bytes_allocated == plain.kv_cache_bytes_allocated
    assert tokens(none.generate(prompts, GREEDY, use_tqdm=False)) == \
        tokens(plain.generate(prompts, GREEDY, use_tqdm=False))


# ---- memory ------------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=st.sampled_from(list(POLICIES)), block_size=st.sampled_from([2, 4, 8]),
       extra=st.integers(0, 9), lengths=st.lists(st.integers(1, 40), min_size=1, max_size=5),
       max_tokens=st.integers(1, 40), seed=st.integers(0, 99))
def test_a_decoding_sequence_holds_at_most_the_budgets_blocks(model, policy, block_size, extra, lengths,
                                                              max_tokens, seed):
    """After every decode step, a sequence holds at most ceil(B / block_size) + 1 blocks (its
    prompt's prefill holds the prompt's blocks until the next step's cut); at the end every block
    is free."""
    budget = max(block_size + (2 if policy == "streaming" else 0), 8) + extra
    if policy == "snapkv":
        budget = max(budget, 5)
    llm = engine(model, policy, budget=budget, block_size=block_size, num_kv_blocks=120)
    cap = max_blocks_per_sequence(llm.eviction, block_size)
    for p in prompts_for(lengths, seed=seed):
        llm.add_request(p, kvlab.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    while llm.has_unfinished_requests():
        llm.step()
        for seq in llm.scheduler.running:
            if len(seq) >= seq.num_prompt_tokens + 2 and not seq.num_preemptions:   # decoded once
                assert len(seq.block_table) <= cap, (seq, cap)
            assert len(seq.block_table) * block_size >= seq.num_computed_tokens - seq.num_evicted_tokens
    assert_all_free(llm)


def test_preemption_recomputes_and_frees(model):
    """A pool too small for all at once: sequences are preempted, recomputed from their tokens, cut
    again, and every block comes back."""
    llm = engine(model, "h2o", num_kv_blocks=12)     # five sequences grow to 5 blocks each
    outs = llm.generate(prompts_for([6, 7, 8, 9, 10], seed=5), GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 30 for o in outs)
    assert llm.scheduler.num_preemptions > 0
    assert_all_free(llm)


def test_memory_budget_counts_the_scores(model):
    budget = 200_000
    h2o = engine(model, "h2o", num_kv_blocks=None, kv_cache_memory_bytes=budget)
    window = engine(model, "window", num_kv_blocks=None, kv_cache_memory_bytes=budget)
    assert h2o.kv_cache_bytes_allocated <= budget and window.kv_cache_bytes_allocated <= budget
    assert h2o.num_kv_blocks < window.num_kv_blocks          # the scores cost blocks
    assert h2o.cache.compactor.nbytes == 3 * h2o.num_kv_blocks * 4 * 2 * 8   # L, slots, H, float64


# ---- the prefix cache --------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["window", "streaming"])
def test_a_cut_never_writes_a_cached_block(model, policy):
    """Two requests share a long prompt: the first is cut (while the second holds the same blocks,
    and after), and a later one still finds the prompt's blocks intact: its tokens equal a fresh
    engine's without prefix caching."""
    prompt = prompts_for([41], seed=7)[0]
    llm = engine(model, policy)
    first = tokens(llm.generate([prompt, prompt], GREEDY, use_tqdm=False))
    later = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert later.num_cached_tokens == 40
    fresh = tokens(engine(model, policy, enable_prefix_caching=False).generate([prompt], GREEDY, use_tqdm=False))
    assert first == fresh * 2 and later.outputs[0].token_ids == fresh[0]
    assert_all_free(llm)


# ---- the copy itself, for every per-token format ----------------------------------------------
@pytest.mark.parametrize("fmt", ["auto", "int8", "fp8"])
@pytest.mark.parametrize("scored", [False, True])
def test_compaction_moves_entries_unchanged(fmt, scored):
    """Entries kept by a cut read back (dequantized) exactly as before it, per KV head; codes and
    scales move as they are."""
    torch.manual_seed(0)
    L, NB, BS, H, D = 2, 12, 4, 3, 8
    kw = dict(num_layers=L, num_blocks=NB, block_size=BS, num_kv_heads=H, head_dim=D)
    cache = PagedKVCache(**kw) if fmt == "auto" else QuantizedPagedKVCache(**kw, kv_cache_dtype=fmt)
    cache.compactor = KVCompactor(L, NB * BS, H, torch.float32, "cpu", scores=scored)
    old_table, n = [7, 2, 9, 4, 0], 19
    slots = table_slots(old_table, n, BS, "cpu")
    for layer in range(L):
        if fmt == "auto":
            cache.ops.reshape_and_cache(torch.randn(n, H, D), torch.randn(n, H, D),
                                        cache.k_cache[layer], cache.v_cache[layer], slots)
        else:
            cache.write(layer, torch.randn(n, H, D), torch.randn(n, H, D), slots)
        if scored:
            cache.compactor.scores[layer][slots] = torch.rand(n, H)
    before = [[read(cache, layer, old_table, n, which) for which in (0, 1)] for layer in range(L)]
    scores = [cache.compactor.scores[layer][slots].clone() for layer in range(L)] if scored else None
    cfg = EvictionConfig("h2o" if scored else "streaming", 10, num_sinks=2, block_size=BS)
    new_table = [2, 11, 5]                                  # reuses one old block
    cache.compactor.compact(cache, [Compaction(old_table, new_table, n, 10, cfg, 0, scored)])
    for layer in range(L):
        if scored:
            top = torch.sort(scores[layer][:n - 5].T, dim=-1, descending=True, stable=True).indices[:, :5]
            keep = torch.sort(torch.cat([top, torch.arange(n - 5, n).expand(H, 5)], 1), 1).values
        else:
            keep = torch.cat([torch.arange(2), torch.arange(n - 8, n)]).expand(H, 10)
        for which in (0, 1):
            after = read(cache, layer, new_table, 10, which)
            expect = before[layer][which].gather(0, keep.T.unsqueeze(-1).expand(10, H, D))
            assert torch.equal(after, expect)


def read(cache, layer, table, n, which):
    blocks = torch.tensor(table)
    if isinstance(cache, PagedKVCache):
        pool = (cache.k_cache, cache.v_cache)[which][layer]
        return pool.index_select(0, blocks).flatten(0, 1)[:n]
    return cache.dequantize_blocks(layer, blocks)[which].flatten(0, 1)[:n]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_formats_run_with_a_budget(model, fmt):
    llm = engine(random_llama(seed=1, dtype=torch.float32), "h2o", kv_cache_dtype=fmt)
    outs = llm.generate(prompts_for([37, 25]), GREEDY, use_tqdm=False)
    assert all(len(t) == 30 for t in tokens(outs)) and llm.scheduler.evictor.num_cuts > 0
    assert_all_free(llm)


# ---- what it refuses ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(kv_budget_tokens=-4), "kv_budget_tokens must be a positive int"),
    (dict(kv_budget_tokens=0), "kv_budget_tokens must be a positive int"),
    (dict(kv_budget_tokens=16.0), "kv_budget_tokens must be a positive int"),
    (dict(kv_budget_tokens=16, kv_eviction="lru"), "kv_eviction must be one of"),
    (dict(kv_budget_tokens=5, kv_eviction="streaming", num_sink_tokens=2), r"must be >= 6"),
    (dict(kv_budget_tokens=3), r"must be >= 4"),
    (dict(kv_eviction="window"), "needs kv_budget_tokens"),
    (dict(kv_budget_tokens=16, kv_eviction_window=4), "kv_eviction_window is the recent window"),
    (dict(kv_budget_tokens=16, kv_eviction="h2o"), "pass enable_prefix_caching=False"),
    (dict(kv_budget_tokens=16, kv_eviction="snapkv"), "pass enable_prefix_caching=False"),
    (dict(kv_budget_tokens=32, kv_cache_dtype="int4"), "kv_cache_dtype='int4' quantizes keys per block"),
    (dict(kv_budget_tokens=16, kv_cache_dtype="int8", keep_sink_token=True), "keep_sink_token"),
    (dict(kv_budget_tokens=16, prefix_cache="radix", block_size=None), "prefix_cache='hash' or 'none'"),
])
def test_bad_combinations_are_refused_at_construction(model, kw, match):
    kw = dict(block_size=4, num_kv_blocks=32) | kw
    if kw["block_size"] is None:
        del kw["block_size"]
    with pytest.raises(ValueError, match=match):
        kvlab.LLM(model=model, **kw)


def test_a_long_prompt_still_fits_the_pool_check(model):
    """A request is refused only if its prompt's prefill cannot fit: the budget bounds the rest."""
    llm = engine(model, "window", num_kv_blocks=12)
    llm.add_request(prompts_for([40])[0], kvlab.SamplingParams(max_tokens=200))   # 10 blocks, then 5
    with pytest.raises(ValueError, match="num_kv_blocks=12"):
        llm.add_request(prompts_for([60])[0], kvlab.SamplingParams(max_tokens=10))
    assert math.ceil(16 / 4) + 1 == max_blocks_per_sequence(llm.eviction, 4)


def test_the_selection_seam_runs_a_plugged_function(model):
    """kv_eviction_keep_top replaces h2o's selection: kvlab's own passed in gives the same tokens,
    a different rule (the oldest instead of the heaviest) other ones, and it is called."""
    from kvlab.evict.policy import keep_top_and_recent
    calls = []

    def counted(scores, budget, recent):
        calls.append(scores.shape)
        return keep_top_and_recent(scores, budget, recent)

    def oldest(scores, budget, recent):
        n = scores.shape[-1]
        idx = torch.cat([torch.arange(budget - recent), torch.arange(n - recent, n)])
        return idx.expand(*scores.shape[:-1], budget)

    prompts = prompts_for([37, 25])
    ref = tokens(engine(model, "h2o").generate(prompts, GREEDY, use_tqdm=False))
    assert tokens(engine(model, "h2o", kv_eviction_keep_top=counted).generate(prompts, GREEDY, use_tqdm=False)) == ref
    assert calls and all(s[0] == 2 for s in calls)             # [KV heads, entries]
    assert tokens(engine(model, "h2o", kv_eviction_keep_top=oldest).generate(prompts, GREEDY, use_tqdm=False)) != ref
    with pytest.raises(ValueError, match="kv_eviction_keep_top"):
        engine(model, "window", kv_eviction_keep_top=counted)
