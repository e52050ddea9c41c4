"""KV cache groups (kvlab/engine/kv_groups.py): a Gemma-2-shaped model (windowed and full layers)
keeps one block table per group over one shared pool, and its windowed group lets the blocks go
that no future query's window reaches; the tokens stay the dense window-masked model's.

Every engine test checks, after every step, each running sequence's tables against the exact
count the design promises (a windowed group of window W holds the blocks from the one of position
first_query - W + 1 to its last; at most ceil((W - 1) / block_size) + 1 after a decode), the KV
memory against its budget, and at the end that every block is free again.
"""
import pytest
import torch
from helpers import GREEDY, assert_all_free, random_prompts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvlab
from kvlab.attention import paged_torch
from kvlab.cache.paged import PagedKVCache
from kvlab.engine.kv_groups import NO_BLOCK, HybridBlockManager, first_needed_block, group_layout, window_blocks
from kvlab.engine.sequence import Sequence
from kvlab.generate import generate
from kvlab.model.presets import GEMMA2_TINY, MISTRAL_TINY, random_model


# ---- helpers ---------------------------------------------------------------------------------------
def recorded(llm):
    """Make llm's scheduler remember its last schedule (llm.last_items: seq_id -> (start, end))."""
    sched, plan = llm.scheduler, llm.scheduler.schedule
    llm.last_items = {}

    def schedule():
        s = plan()
        llm.last_items = {it.seq.seq_id: (it.start, it.end) for it in s.items}
        return s

    sched.schedule = schedule
    return llm


def check_tables(llm):
    """Every running sequence that ran this step holds exactly the blocks its chunk needs in each
    group (see the module docstring); a decode, at most window_blocks(W, bs) in a windowed group."""
    bm, bs, layout = llm.block_manager, llm.block_size, llm.kv_groups
    assert llm.kv_cache_bytes_allocated <= llm.kv_cache_memory_bytes
    if layout is None:                                          # the one-table engine
        return
    for seq in llm.scheduler.running:
        if seq.seq_id not in llm.last_items:
            continue
        start, end = llm.last_items[seq.seq_id]
        for window, table in zip(layout.windows, seq.kv_group_tables):
            lo = first_needed_block(window, start, bs)
            assert len(table) == -(-end // bs)
            assert all(b == NO_BLOCK for b in table[:lo]) and NO_BLOCK not in table[lo:]
            if window is not None and end - start == 1:
                assert len(table) - lo <= window_blocks(window, bs)
        assert bm.live_blocks(seq)[0] == -(-end // bs)          # the full group keeps everything


def run(llm, prompts, max_tokens, abort_after=None):
    """Step llm to the end, checking the tables after every step; -> completion tokens per prompt
    (the aborted request's stay partial)."""
    recorded(llm)
    rids = [llm.add_request(p, kvlab.SamplingParams(max_tokens=max_tokens, **GREEDY)) for p in prompts]
    seqs = [llm.engine.requests[r] for r in rids]
    steps = 0
    while llm.has_unfinished_requests():
        llm.step()
        steps += 1
        if steps == abort_after:
            llm.abort_request(rids[0])
        check_tables(llm)
    assert_all_free(llm)
    return [s.completion_token_ids for s in seqs]


def gemma(window=6, dtype=torch.float64, seed=3):
    return random_model("gemma2-tiny", seed=seed, dtype=dtype, sliding_window=window)


# ---- the layout --------------------------------------------------------------------------------------
def test_layers_are_grouped_by_window_and_share_slots():
    g = group_layout(GEMMA2_TINY.sliding_windows, 4)
    assert g.windows == (None, 16) and g.layers == ((1, 3), (0, 2))
    assert g.num_slots == 2 and g.layer_group == (1, 0, 1, 0) and g.layer_slot == (0, 0, 1, 1)
    g = group_layout((4, None, 8, None, 4), 5)
    assert g.windows == (None, 4, 8) and g.layers == ((1, 3), (0, 4), (2,)) and g.num_slots == 2
    assert group_layout(MISTRAL_TINY.sliding_windows, 4).num_groups == 1
    assert window_blocks(1, 4) == 1 and window_blocks(5, 4) == 2 and window_blocks(6, 4) == 3


def test_the_cache_shares_one_tensor_per_slot():
    layout = group_layout(GEMMA2_TINY.sliding_windows, 4)
    cache = PagedKVCache(4, 10, 4, 2, 16, sliding_windows=GEMMA2_TINY.sliding_windows, kv_groups=layout)
    assert cache.k_cache[0] is cache.k_cache[1] and cache.v_cache[2] is cache.v_cache[3]
    assert cache.k_cache[0] is not cache.k_cache[2]
    assert cache.nbytes == 10 * PagedKVCache.bytes_per_block(2, 4, 2, 16)
    with pytest.raises(ValueError, match="kv_groups must group the layers by their sliding_windows"):
        PagedKVCache(4, 10, 4, 2, 16, sliding_windows=(16, 16, None, None), kv_groups=layout)


# ---- the engine against the dense window-masked reference -------------------------------------------
@pytest.mark.parametrize("backend,chunked", [("torch", False), ("torch", True), ("cpu", False), ("cpu", True)])
def test_gemma_shaped_engine_frees_windowed_blocks_and_gives_the_reference(backend, chunked):
    model = gemma()
    prompts = random_prompts((2, 14, 25, 31), seed=3, shared=9)
    want = [generate(model, p, 20) for p in prompts]
    llm = kvlab.LLM(model, block_size=2, num_kv_blocks=400, max_model_len=64, max_num_seqs=4,
                    attention_backend=backend, enable_chunked_prefill=chunked,
                    max_num_batched_tokens=8 if chunked else None)
    assert llm.kv_groups.windows == (None, 6) and llm.eviction is None
    assert run(llm, prompts, 20) == want
    again = run(llm, prompts, 20)                               # prefix hits in both groups
    assert again == want
    assert llm.block_manager.prefix_cache_hits > sum(len(p) for p in prompts) // 2


def test_a_windowed_layer_reads_its_own_group_and_nothing_freed():
    """Blocks let go by the windowed group are reused by the other sequences (a small pool): the
    tokens stay exact, so no layer reads a freed block; the windowed layers' tables are shorter."""
    model = gemma(window=4)
    prompts = random_prompts((17, 23, 30), seed=5)
    want = [generate(model, p, 16) for p in prompts]
    seen = []

    class Recording:
        reshape_and_cache = staticmethod(paged_torch.reshape_and_cache)

        def paged_decode_attention(self, q, kc, vc, tables, ctx, scale, **kw):
            seen.append((kw.get("sliding_window"), tables.shape[1], ctx.tolist()))
            return paged_torch.paged_decode_attention(q, kc, vc, tables, ctx, scale, **kw)

        def paged_prefill_attention(self, *args, **kw):
            return paged_torch.paged_prefill_attention(*args, **kw)

    llm = kvlab.LLM(model, attention_backend=Recording(), block_size=2, num_kv_blocks=60, max_model_len=64,
                    enable_prefix_caching=False)
    assert run(llm, prompts, 16) == want
    windowed = [s for s in seen if s[0] == 4]
    full = [s for s in seen if s[0] is None]
    assert windowed and len(windowed) == len(full)
    assert max(w[1] for w in windowed) <= window_blocks(4, 2) and max(f[1] for f in full) > 10


def test_preemption_by_recompute_gives_the_reference():
    model = gemma(window=5)
    prompts = random_prompts((20, 26, 13, 29), seed=7)
    want = [generate(model, p, 24) for p in prompts]
    for chunked in (False, True):
        llm = kvlab.LLM(model, block_size=4, num_kv_blocks=30, max_model_len=64, max_num_seqs=4,
                        enable_chunked_prefill=chunked, max_num_batched_tokens=16 if chunked else None)
        assert run(llm, prompts, 24) == want
        assert llm.scheduler.num_preemptions > 0


def test_fast_model_on_the_cpu_backend():
    """FastLlama (the serving model) goes through the same cache.attend: its tokens with groups are
    its own dense windowed tokens."""
    from kvlab.model.fast import FastLlama

    model = FastLlama(gemma(window=5))
    prompts = random_prompts((19, 7), seed=4)
    llm = kvlab.LLM(model, attention_backend="cpu", block_size=4, num_kv_blocks=40, max_model_len=64)
    assert llm.kv_groups is not None
    assert run(llm, prompts, 12) == [generate(model, p, 12) for p in prompts]


def test_triton_backend_gives_the_torch_backends_tokens():
    pytest.importorskip("triton", reason="Triton is Linux-only")
    from helpers import DEVICE
    model = gemma(window=5, dtype=torch.float32).to(DEVICE)
    prompts = random_prompts((13, 6), seed=2)
    outs = []
    for backend in ("torch", "triton"):
        llm = kvlab.LLM(model, attention_backend=backend, block_size=4, num_kv_blocks=24, max_model_len=64)
        outs.append(run(llm, prompts, 8))
    assert outs[0] == outs[1]


def test_a_failed_forward_is_rolled_back_in_every_group():
    """A forward that raises mid-generation (after blocks were let go): the step is rolled back
    (its registrations taken back in every group), the sequences recompute, and both this run and
    a second one that hits the prefix cache give the reference."""
    model = gemma(window=5)
    prompts = random_prompts((9, 15, 22), seed=13, shared=8)
    want = [generate(model, p, 14) for p in prompts]
    llm = recorded(kvlab.LLM(model, block_size=2, num_kv_blocks=120, max_model_len=64, max_num_seqs=4,
                             enable_chunked_prefill=True, max_num_batched_tokens=8))
    forward, calls = llm.model.forward, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] in (4, 9):
            raise RuntimeError("the forward failed")
        return forward(*args, **kwargs)

    llm.model.forward = failing
    seqs = [llm.engine.requests[llm.add_request(p, kvlab.SamplingParams(max_tokens=14, **GREEDY))]
            for p in prompts]
    failures = 0
    while llm.has_unfinished_requests():
        try:
            llm.step()
        except RuntimeError:
            failures += 1
            continue
        check_tables(llm)
    del llm.model.forward
    assert failures == 2 and [s.completion_token_ids for s in seqs] == want
    assert_all_free(llm)
    assert run(llm, prompts, 14) == want and llm.block_manager.prefix_cache_hits > 0


# ---- memory -------------------------------------------------------------------------------------------
def test_the_same_budget_holds_more_sequences():
    """A block id costs num_slots = 2 layers (not 4), so the same bytes give twice the ids; with
    the windows freed, 4 sequences that preempt each other on one table run side by side."""
    model = gemma(window=4)
    budget = 40 * PagedKVCache.bytes_per_block(4, 4, 2, 16, torch.float64)   # 40 blocks of one table
    prompts = random_prompts((30, 30, 30, 30), seed=11)
    hybrid = kvlab.LLM(model, block_size=4, kv_cache_memory_bytes=budget, max_model_len=64,
                       enable_prefix_caching=False)
    single = kvlab.LLM(model, block_size=4, kv_cache_memory_bytes=budget, max_model_len=64,
                       enable_prefix_caching=False, kv_budget_tokens=10_000)   # the one-table engine
    assert single.kv_groups is None and hybrid.bytes_per_block * 2 == single.bytes_per_block
    assert hybrid.num_kv_blocks == 2 * single.num_kv_blocks == 80
    outs = [run(llm, prompts, 24) for llm in (hybrid, single)]
    assert outs[0] == outs[1] == [generate(model, p, 24) for p in prompts]
    assert hybrid.scheduler.num_preemptions == 0 < single.scheduler.num_preemptions


# ---- prefix caching across groups ----------------------------------------------------------------------
def test_a_hit_needs_the_windowed_groups_blocks_at_the_hit_point_only():
    """vLLM's rule: the full group needs every block before the hit, a windowed group only those its
    window reads at the hit point."""
    bm = HybridBlockManager(64, 2, (None, 4))
    a = Sequence(list(range(20)))
    bm.allocate(a)                                       # all 20 tokens computed: 10 blocks per group
    windowed = list(a.kv_group_tables[1])
    bm.deallocate(a)
    b = Sequence(list(range(20)) + [99])
    assert bm.lookup(b) == 20                            # the last token is computed: k <= 10 blocks
    evict = bm.groups[1]._evict
    evict(bm.blocks[windowed[0]])                        # outside the window at 20 and at 18
    assert bm.lookup(b) == 20
    evict(bm.blocks[windowed[9]])                        # read at 20 (positions 17..19)
    assert bm.lookup(b) == 18                            # 18 reads positions 15..17: blocks 7, 8
    evict(bm.blocks[windowed[8]])
    assert bm.lookup(b) == 16
    bm.allocate(b, 21)
    assert b.num_cached_tokens == 16
    assert b.kv_group_tables[1][:first_needed_block(4, 16, 2)] == [NO_BLOCK] * 6
    assert b.kv_group_tables[1][6:8] == windowed[6:8] and b.block_table[:8] == a_full(bm, b)
    bm.deallocate(b)
    assert bm.num_free_blocks == 64


def a_full(bm, seq):
    """seq's full-group blocks 0..7 as the prefix cache names them."""
    return [bm.groups[0].cached[h] for h in bm.groups[0].probe(seq, 8)[1]]


def test_prefix_caching_on_and_off_give_the_same_tokens():
    model = gemma(window=5)
    prompts = random_prompts((3, 11, 20), seed=9, shared=14)
    want = [generate(model, p, 12) for p in prompts]
    for caching in (True, False):
        for chunked in (False, True):
            llm = kvlab.LLM(model, block_size=2, num_kv_blocks=200, max_model_len=64, max_num_seqs=4,
                            enable_prefix_caching=caching, enable_chunked_prefill=chunked,
                            max_num_batched_tokens=8 if chunked else None)
            assert run(llm, prompts, 12) == want and run(llm, prompts[::-1], 12) == want[::-1]
            assert (llm.block_manager.prefix_cache_hits > 0) == caching


def test_what_stays_refused_or_single_table():
    model = gemma()
    with pytest.raises(ValueError, match="kv_cache_dtype='int8' with a model that has sliding-window"):
        kvlab.LLM(model, kv_cache_dtype="int8", num_kv_blocks=16, max_model_len=64)
    with pytest.raises(ValueError, match="kv_eviction='h2o' with a model that has sliding-window"):
        kvlab.LLM(model, kv_budget_tokens=32, kv_eviction="h2o", num_kv_blocks=16, max_model_len=64,
                  enable_prefix_caching=False)
    default = kvlab.LLM(model, max_model_len=64, max_num_seqs=4)          # groups, prefix caching on
    assert default.kv_groups is not None and default.prefix_cache == "hash"
    p = random_prompts((20,), seed=1)[0]
    assert run(default, [p, p], 10) == [generate(model, p, 10)] * 2
    radix = kvlab.LLM(model, prefix_cache="radix", num_kv_blocks=64, max_model_len=64)
    assert radix.kv_groups is None                       # one table: correct, frees nothing
    mistral = kvlab.LLM(random_model("mistral-tiny", dtype=torch.float64), num_kv_blocks=64, max_model_len=64)
    assert mistral.kv_groups is None and mistral.eviction.policy == "window"
    with pytest.raises(ValueError, match="needs up to 20 KV blocks"):       # 2 groups x ceil(37 / 4)
        kvlab.LLM(model, block_size=4, num_kv_blocks=19, max_model_len=64).add_request(
            list(range(30)), kvlab.SamplingParams(max_tokens=8))


# ---- invariants under random workloads -------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), bs=st.sampled_from([1, 2, 4]), window=st.integers(1, 9), chunked=st.booleans(),
       caching=st.booleans(), shared=st.sampled_from([0, 8, 17]))
def test_random_workloads_keep_the_invariants(data, bs, window, chunked, caching, shared):
    """Any block size, window, prompt mix, pool (down to one request's worth: preemption), chunked
    prefill, prefix caching, an abort: the tables hold exactly what the windows need after every
    step, the budget holds, nothing leaks, and the finished requests give the reference tokens."""
    lengths = data.draw(st.lists(st.integers(1, 24), min_size=1, max_size=5), label="lengths")
    max_tokens = data.draw(st.integers(1, 10), label="max_tokens")
    prompts = random_prompts(lengths, seed=window, shared=shared)
    longest = max(map(len, prompts)) + max_tokens - 1
    need = 2 * -(-longest // bs)
    pool = data.draw(st.integers(need, 2 * need), label="pool")
    abort_after = data.draw(st.sampled_from([None, 1, 3]), label="abort_after")
    per_block = PagedKVCache.bytes_per_block(2, bs, 2, 16, torch.float64)     # 2 slots of 4 layers
    budget = pool * per_block + data.draw(st.integers(0, per_block - 1), label="slack")
    model = gemma(window=window, seed=window)
    llm = kvlab.LLM(model, block_size=bs, kv_cache_memory_bytes=budget, max_model_len=64, max_num_seqs=4,
                    enable_prefix_caching=caching, enable_chunked_prefill=chunked,
                    max_num_batched_tokens=8 if chunked else None)
    assert llm.num_kv_blocks == pool and llm.kv_cache_memory_bytes == budget
    got = run(llm, prompts, max_tokens, abort_after)
    want = [generate(model, p, max_tokens) for p in prompts]
    for i, (w, tokens) in enumerate(zip(want, got)):
        assert tokens == (w[:len(tokens)] if i == 0 and abort_after else w)
    if caching:                                       # again, from what the first pass left cached
        assert run(llm, prompts[::-1], max_tokens) == want[::-1]
