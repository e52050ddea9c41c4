"""The seven correctness gaps of issue 13, one test each (each failed before its fix).

1. cache_salt through generate() (a dict prompt, as vLLM takes it);
2. a de-duplicated parent evicted: its children stay findable under later identical prefixes;
3. admission counts the tokens it will compute, not the prefix-cache hits;
4. chunked prefill allocates blocks chunk by chunk;
5. a forward that raises leaves no block findable without K/V, and no residual row open;
6. generate(tensor) is one request;
7. an abort hands a RequestOutput (finish reason "abort") to step() callers.
"""
import pytest
import torch
from helpers import GREEDY

from kvlab import LLM, SamplingParams
from kvlab.engine.block_manager import BlockManager
from kvlab.engine.scheduler import Scheduler
from kvlab.engine.sequence import Sequence


def _prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def test_gap1_cache_salt_in_a_dict_prompt_isolates_tenants(model64):
    llm = LLM(model64, block_size=4, num_kv_blocks=32, max_model_len=64)
    p = _prompt(20)
    params = SamplingParams(max_tokens=2, **GREEDY)
    a = llm.generate({"prompt_token_ids": p, "cache_salt": "tenant-a"}, params, use_tqdm=False)[0]
    b = llm.generate({"prompt_token_ids": p, "cache_salt": "tenant-b"}, params, use_tqdm=False)[0]
    a2 = llm.generate({"prompt_token_ids": p, "cache_salt": "tenant-a"}, params, use_tqdm=False)[0]
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens == 0                     # another tenant finds nothing
    assert a2.num_cached_tokens == 16                   # the same tenant finds its 4 full blocks
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == a2.outputs[0].token_ids
    with pytest.raises(ValueError, match="cache_salt"):
        llm.generate({"prompt_token_ids": p, "cache_salt": 3}, params, use_tqdm=False)


def test_gap2_evicted_duplicate_parent_does_not_strand_its_children():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = Sequence([1, 2, 3, 4, 9]), Sequence([1, 2, 7, 8, 9])
    bm.allocate(a, num_computed=0)                      # admitted in the same step: neither finds
    bm.allocate(b, num_computed=0)                      # the other's first block
    bm.register_computed(a, len(a))                     # a's [1, 2] is the canonical block; b's
    bm.register_computed(b, len(b))                     # copy is not, its [7, 8] hangs under a's
    bm.deallocate(a)
    bm.deallocate(b)
    fillers = [Sequence([60 + i]) for i in range(7)]    # evict a's blocks (LRU), not b's [7, 8]
    for f in fillers:
        bm.allocate(f)
    for f in fillers:
        bm.deallocate(f)
    c = Sequence([1, 2, 7, 8, 9])
    bm.allocate(c)                                      # [1, 2] recomputed: a new canonical block
    assert c.num_cached_tokens == 0
    d = Sequence([1, 2, 7, 8, 9])
    bm.allocate(d)
    assert d.num_cached_tokens == 4                     # [7, 8] is found under the new parent


def test_gap3_admission_counts_computed_tokens_not_hits():
    bm = BlockManager(num_blocks=64, block_size=4)
    shared = list(range(100, 148))                      # 48 tokens, 12 full blocks
    donor = Sequence(shared + [1])
    bm.allocate(donor)
    bm.deallocate(donor)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [Sequence(shared + [10 + i] * 12) for i in range(3)]   # 60 tokens, 48 cached: 12 to compute
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [s.seq_id for s in out.seqs] == [s.seq_id for s in seqs]
    assert sum(item.num_tokens for item in out.items) == 36 <= 64


def test_gap4_chunked_prefill_allocates_per_chunk():
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8, enable_chunked_prefill=True)
    s = Sequence(list(range(40)))
    sched.add(s)
    sched.schedule()
    assert len(s.block_table) == 2                      # the first chunk's 8 tokens, not 40
    sched.schedule()
    assert len(s.block_table) == 4


class _Boom(RuntimeError):
    pass


def _failing_once(model):
    calls = {"n": 0}
    forward = model.forward

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            kwargs["cache"].attend(0, *_dummy_qkv(model, args[0].shape[1]))   # rows opened, then
            raise _Boom("the forward failed")                                 # the step dies
        return forward(*args, **kwargs)
    return wrapped


def _dummy_qkv(model, n):
    c = model.config
    q = torch.zeros(1, n, c.num_heads, c.head_dim, dtype=model.dtype)
    k = torch.zeros(1, n, c.num_kv_heads, c.head_dim, dtype=model.dtype)
    return q, k, k.clone()


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int4"])
def test_gap5_a_failed_forward_leaves_nothing_findable_and_no_row_open(model64, reference, kv_cache_dtype):
    llm = LLM(model64, block_size=4, num_kv_blocks=32, max_model_len=64, kv_cache_dtype=kv_cache_dtype)
    p = _prompt(18, seed=5)
    llm.add_request(p, SamplingParams(max_tokens=3, **GREEDY), request_id="x")
    llm.model.forward = _failing_once(llm.model)
    try:
        with pytest.raises(_Boom):
            llm.step()
    finally:
        del llm.model.forward
    assert len(llm.block_manager.cached) == 0           # no block entered the cache without K/V
    llm.abort_request("x")
    llm.step()                                          # the abort's events reach the cache
    assert llm.block_manager.num_free_blocks == 32
    if kv_cache_dtype == "int4":
        assert llm.cache.num_residual_blocks == 0
    out = llm.generate([p], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference(p, 3) and out.num_cached_tokens == 0


def test_gap6_generate_of_a_tensor_is_one_request(model64, reference):
    llm = LLM(model64, block_size=4, num_kv_blocks=32, max_model_len=64)
    p = _prompt(7, seed=6)
    outs = llm.generate(torch.tensor(p), SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert len(outs) == 1 and outs[0].prompt_token_ids == p
    assert outs[0].outputs[0].token_ids == reference(p, 3)


def test_gap7_abort_returns_an_output_and_stays_out_of_the_latency_histograms(model64):
    llm = LLM(model64, block_size=4, num_kv_blocks=32, max_model_len=64)
    llm.add_request(_prompt(5), SamplingParams(max_tokens=20, **GREEDY), request_id="a")
    llm.add_request(_prompt(6, seed=1), SamplingParams(max_tokens=2, **GREEDY), request_id="b")
    llm.add_request(_prompt(6, seed=2), SamplingParams(max_tokens=2, **GREEDY), request_id="w")
    llm.step()
    llm.abort_request(["a", "w"])
    outs = {o.request_id: o for o in llm.step()}
    assert outs["a"].finished and outs["a"].outputs[0].finish_reason == "abort"
    assert outs["a"].new_token_ids == [] and len(outs["a"].outputs[0].token_ids) == 1
    assert outs["w"].finished and outs["w"].outputs[0].finish_reason == "abort"
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.step() == []                             # reported once
    m = llm.get_metrics()
    assert m["num_requests_finished"] == 3 and m["num_requests_aborted"] == 2
    assert m["e2e_request_latency_seconds"].count == 1  # only b finished on its own
    assert m["time_to_first_token_seconds"].count == 1
