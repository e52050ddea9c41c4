"""Prefix caching through kvlab.LLM: greedy outputs with caching on are identical to caching off
(and to the contiguous-cache reference), and the prefill work saved equals the hit count.

Workloads: shared system prompts (in one batch, so requests admitted in the same step share
blocks, and in later batches), a multi-turn chat, partial-block prefixes, eviction under memory
pressure with preemption, cache_salt, and one run on the real model. Tokens computed are counted
where the model sees them: the width of every packed forward pass.
"""

import pytest
import torch
from helpers import GREEDY

from kvlab import LLM, SamplingParams


def _tokens(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _count_computed(llm):
    """Wrap the model runner: llm.computed counts every token the model runs on, llm.prefilled
    those of admissions (a sequence computing from its cached prefix on), llm.decoded the rest."""
    llm.computed = llm.prefilled = llm.decoded = 0
    prepare = llm.runner.prepare

    def counting(items):
        for it in items:
            if it.start == it.seq.num_cached_tokens:    # an admission (decodes start later)
                llm.prefilled += it.num_tokens
            else:
                llm.decoded += it.num_tokens
        out = prepare(items)
        llm.computed += out[0].shape[1]
        return out
    llm.runner.prepare = counting
    return llm


def _engine(model, caching, **kw):
    kw = {"block_size": 8, "num_kv_blocks": 64, "max_model_len": 256, **kw}
    return _count_computed(LLM(model, enable_prefix_caching=caching, **kw))


def _check_clean(llm):
    """All blocks free, each once in the free queue; every hash names a block holding those tokens."""
    bm = llm.block_manager
    assert not llm.has_unfinished_requests()
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert sorted(bm.free_queue) == list(range(bm.num_blocks))
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].block_hash == h and len(bm.blocks[block_id].token_ids) == bm.block_size


def _run_batches(llm, batches):
    """Generate batch after batch on one engine -> (token lists, cached-token counts)."""
    toks, cached = [], []
    for prompts, n in batches:
        outs = llm.generate(prompts, SamplingParams(max_tokens=n, **GREEDY), use_tqdm=False)
        toks += [o.outputs[0].token_ids for o in outs]
        cached += [o.num_cached_tokens for o in outs]
    return toks, cached


def _on_off_equal(model, reference, batches, **kw):
    on, off = _engine(model, True, **kw), _engine(model, False, **kw)
    toks_on, cached = _run_batches(on, batches)
    toks_off, cached_off = _run_batches(off, batches)
    assert toks_on == toks_off and not any(cached_off)
    prompts = [(p, n) for ps, n in batches for p in ps]
    if reference is not None:
        assert toks_on == [reference(p, n) for p, n in prompts]
    hits = on.block_manager.prefix_cache_hits
    assert hits == on.get_metrics()["prefix_cache_hits"]
    assert hits == sum(cached) or on.scheduler.num_preemptions > 0   # re-admissions look up again
    bm = on.block_manager
    assert on.prefilled == bm.prefix_cache_queries - hits and off.prefilled == bm.prefix_cache_queries \
        or on.scheduler.num_preemptions + off.scheduler.num_preemptions > 0
    if on.scheduler.num_preemptions == off.scheduler.num_preemptions == 0:
        assert off.computed - on.computed == hits          # the work saved is the hit count
    _check_clean(on)
    return on, off, cached


def test_shared_system_prompt(model64, reference):
    system = _tokens(37, seed=0)                            # 4 full blocks of 8, then 5 tokens
    qs = [_tokens(n, seed=10 + i) for i, n in enumerate([3, 20, 9, 14, 1, 6])]
    batches = [([system + q for q in qs[:3]], 6), ([system + q for q in qs[3:]], 4)]
    on, off, cached = _on_off_equal(model64, reference, batches)
    # the first request computes the system prompt; the other two, admitted in the same step,
    # already share its blocks (written in the same forward pass, before attention reads them)
    assert cached == [0, 32, 32, 32, 32, 32]
    prompt_tokens = sum(len(p) for ps, _ in batches for p in ps)
    decode_tokens = sum((n - 1) * len(ps) for ps, n in batches)
    assert on.computed == prompt_tokens - sum(cached) + decode_tokens
    assert on.block_manager.prefix_cache_queries == prompt_tokens


def test_multi_turn_chat(model64, reference):
    bs, n = 8, 10
    on, off = _engine(model64, True, block_size=bs), _engine(model64, False, block_size=bs)
    history, previous = _tokens(21, seed=1), 0
    for turn in range(4):
        outs = [llm.generate([history], SamplingParams(max_tokens=n, **GREEDY), use_tqdm=False)[0]
                for llm in (on, off)]
        assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == reference(history, n)
        if turn:
            # everything computed last turn is cached: its prompt and all but its last output
            assert outs[0].num_cached_tokens == (previous - 1) // bs * bs
        history = history + outs[0].outputs[0].token_ids
        previous = len(history)
        history = history + _tokens(5, seed=100 + turn)     # the next user message
    assert off.computed - on.computed == on.block_manager.prefix_cache_hits > 0
    _check_clean(on)


def test_partial_block_prefixes(model64, reference):
    base = _tokens(24, seed=2)                              # 3 full blocks of 8
    prompts = [
        base,                                               # computes and caches 3 blocks
        base[:13] + _tokens(6, seed=3),                     # shares 13 tokens: 1 block
        base[:20],                                          # a strict prefix: 2 blocks
        base[:16],                                          # exactly 2 blocks: the last is recomputed
        list(base),                                         # the same prompt: 2 blocks, not 3
        base[:7] + _tokens(4, seed=4),                      # under one block: nothing
    ]
    batches = [([p], 5) for p in prompts]
    _, _, cached = _on_off_equal(model64, reference, batches)
    assert cached == [0, 8, 16, 8, 16, 0]


def test_eviction_under_memory_pressure(model64, reference):
    systems = [_tokens(12, seed=20 + i) for i in range(3)]
    prompts = [systems[i % 3] + _tokens(3 + i % 5, seed=30 + i) for i in range(12)]
    batches = [(prompts[:6], 9), (prompts[6:], 7), (prompts[:4], 5)]
    on, off, cached = _on_off_equal(model64, reference, batches, block_size=4, num_kv_blocks=16,
                                    max_model_len=64)
    bm = on.block_manager
    assert bm.num_evicted_blocks > 0 and on.scheduler.num_preemptions > 0
    assert sum(cached) > 0
    # the work still balances: admissions (re-admissions after preemption too) compute exactly
    # their uncached tokens, decodes one token each
    assert on.prefilled == bm.prefix_cache_queries - bm.prefix_cache_hits
    assert on.computed == on.prefilled + on.decoded


def test_cache_salt_isolates_requests(model64):
    llm = _engine(model64, True)
    prompt = _tokens(30, seed=5)
    cached = {}
    for rid, salt in [("a1", "alice"), ("b1", "bob"), ("a2", "alice"), ("n1", None)]:
        llm.add_request(prompt, SamplingParams(max_tokens=2, **GREEDY), request_id=rid, cache_salt=salt)
        while llm.has_unfinished_requests():
            for out in llm.step():
                cached[out.request_id] = out.num_cached_tokens
    assert cached == {"a1": 0, "b1": 0, "a2": 24, "n1": 0}
    _check_clean(llm)


@pytest.fixture
def one_thread():
    """One torch thread: on a shared, oversubscribed CPU two threads mostly wait for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_real_model_shared_system_prompt(real_model, one_thread):
    model, tok = real_model
    system = {"role": "system", "content": "You are a concise assistant for a course on KV caches. "
              "Answer in one short sentence, with no preamble, and never more than twenty words."}
    questions = ["What is a KV cache?", "Why page memory?"]
    convs = [[system, {"role": "user", "content": q}] for q in questions]
    outs = {}
    for caching in (True, False):
        llm = LLM((model, tok), block_size=16, num_kv_blocks=32, max_model_len=256,
                  enable_prefix_caching=caching)
        first = llm.chat(convs[0], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)
        rest = llm.chat(convs[1:], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)
        outs[caching] = [o.outputs[0].token_ids for o in first + rest]
        if caching:
            assert first[0].num_cached_tokens == 0
            assert all(o.num_cached_tokens >= 32 for o in rest)
    assert outs[True] == outs[False]
