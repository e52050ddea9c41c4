"""All KV memory stays inside the budget (kvlab/engine/kv_budget.py): random bursts of requests
(int4, int2, fp8 with sinks; chunked prefill; shared prefixes; aborts; pools small enough to
preempt) and, at every step, the bytes of every tensor the cache holds never exceed
`kv_cache_memory_bytes` and never change: the residual and sink pools were preallocated and
never grow (a fixed pool that ran out would raise)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvlab import LLM, SamplingParams


def _tensor_bytes(cache) -> int:
    """Bytes of every tensor reachable from the cache's attributes (lists and pools included)."""
    seen, total, stack = set(), 0, [cache]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__dict__") and obj.__class__.__module__.startswith(("kvlab.cache", "kvlab.quant")):
            stack.extend(vars(obj).values())
    return total


@st.composite
def bursts(draw):
    fmt, sinks = draw(st.sampled_from([("int4", False), ("int2", False), ("fp8", True), ("int4", True),
                                       ("int8", True)]))
    block_size = draw(st.sampled_from([2, 4, 8]))
    shared = draw(st.lists(st.integers(0, 255), min_size=0, max_size=24))
    reqs = [dict(prompt=shared[:draw(st.integers(0, len(shared)))] +
                 draw(st.lists(st.integers(0, 255), min_size=1, max_size=20)),
                 max_tokens=draw(st.integers(1, 8)), arrival=draw(st.integers(0, 6)),
                 abort=draw(st.one_of(st.none(), st.integers(0, 10))))
            for _ in range(draw(st.integers(1, 8)))]
    return dict(fmt=fmt, sinks=sinks, block_size=block_size, reqs=reqs,
                max_num_seqs=draw(st.integers(1, 4)), chunk=draw(st.sampled_from([None, 8, 16])),
                budget=draw(st.integers(12, 40)), prefix=draw(st.booleans()))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=bursts())
def test_kv_memory_never_leaves_the_budget(tiny_model, w):
    row = 2 * tiny_model.config.num_layers * tiny_model.config.num_kv_heads * tiny_model.config.head_dim * 4
    budget = w["budget"] * w["block_size"] * row           # ~budget float32 blocks' worth of bytes
    llm = LLM(tiny_model, block_size=w["block_size"], kv_cache_memory_bytes=budget, max_model_len=64,
              max_num_seqs=w["max_num_seqs"], max_num_batched_tokens=w["chunk"] or 64,
              enable_chunked_prefill=w["chunk"] is not None, kv_cache_dtype=w["fmt"],
              keep_sink_token=w["sinks"], enable_prefix_caching=w["prefix"])
    allocated = llm.kv_cache_bytes_allocated
    assert allocated <= budget and _tensor_bytes(llm.cache) == allocated
    ids, step = {}, 0
    while step <= 10 or llm.has_unfinished_requests():
        for i, r in enumerate(w["reqs"]):
            if r["arrival"] == step:
                try:
                    ids[i] = llm.add_request(r["prompt"], SamplingParams(temperature=0, ignore_eos=True,
                                                                         max_tokens=r["max_tokens"]))
                except ValueError as e:                    # too long for this small pool
                    assert "num_kv_blocks" in str(e)
            if r["abort"] == step and i in ids:
                llm.abort_request(ids[i])
        llm.step()
        assert llm.kv_cache_bytes_allocated == allocated == _tensor_bytes(llm.cache) <= budget
        step += 1
        assert step < 1000, "the engine stopped making progress"
    assert llm.block_manager.num_free_blocks == llm.num_kv_blocks
    if w["fmt"] in ("int4", "int2"):
        assert llm.cache.num_residual_blocks == 0


@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_the_default_budget_holds_the_rows(tiny_model, fmt):
    """The defaults (max_num_seqs=256, max_num_batched_tokens=2048): the residual rows a step can
    need are reserved inside the 512 MiB cap or the full-length budget, never on top of it."""
    llm = LLM(tiny_model, kv_cache_dtype=fmt, keep_sink_token=True)
    assert llm.kv_cache_bytes_allocated <= llm.kv_cache_memory_bytes
    assert llm.cache.residual.fixed and llm.cache.sinks.fixed
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        LLM(tiny_model, kv_cache_dtype=fmt, kv_cache_memory_bytes=1000)


def _small_row_pool(monkeypatch, residual_rows=None, sink_rows=None):
    """Engines built after this get residual / sink pools of that many rows, fewer than any
    schedule may need: only admission's row count keeps the steps inside them."""
    import kvlab.engine.llm as llm_module

    real = llm_module.kv_costs

    def costs(*args, **kw):
        c = real(*args, **kw)
        c.max_residual_rows = residual_rows or c.max_residual_rows
        c.max_sink_rows = sink_rows or c.max_sink_rows
        return c
    monkeypatch.setattr(llm_module, "kv_costs", costs)


@pytest.mark.parametrize("chunked", [False, True])
def test_admission_counts_residual_rows(tiny_model, monkeypatch, chunked):
    """A burst of 4 prompts of 3 int4 blocks each needs 12 residual rows in its first step; the
    pool has 4. The scheduler admits what fits (a prompt, or a chunk of whole blocks) and the
    rest waits: no step ever asks the fixed pool for a row it does not have. Whole prompts: the
    greedy tokens equal those of an engine with the full pool (chunks read earlier blocks
    quantized, KIVI's prefill does not, so chunked tokens may differ and only lengths are compared)."""
    prompts = [[i + 1] * 3 + list(range(10 + i, 16 + i)) for i in range(4)]   # 9 tokens, blocks of 4
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    kw = dict(block_size=4, num_kv_blocks=32, max_model_len=32, max_num_seqs=4, kv_cache_dtype="int4",
              enable_chunked_prefill=chunked, max_num_batched_tokens=16 if chunked else 64)
    want = [o.outputs[0].token_ids for o in LLM(tiny_model, **kw).generate(prompts, params, use_tqdm=False)]
    _small_row_pool(monkeypatch, residual_rows=4)
    llm = LLM(tiny_model, **kw)
    assert llm.cache.residual.k_res[0].shape[0] == 4 and llm.cache.residual.fixed
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert (got == want if not chunked else [len(t) for t in got] == [6] * 4)
    assert llm.cache.num_residual_blocks == 0


def test_admission_counts_sink_rows(tiny_model, monkeypatch):
    """keep_sink_token with a pool of 2 sink rows and no prefix caching: at most two sequences
    (two first blocks) run at once, and every request completes."""
    _small_row_pool(monkeypatch, sink_rows=2)
    llm = LLM(tiny_model, block_size=4, num_kv_blocks=32, max_model_len=32, max_num_seqs=4,
              kv_cache_dtype="int8", keep_sink_token=True, enable_prefix_caching=False)
    assert llm.cache.sinks.k_res[0].shape[0] == 2
    for i in range(4):
        llm.add_request([i + 1] * 5, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    peak = 0
    while llm.has_unfinished_requests():
        llm.step()
        peak = max(peak, len(llm.scheduler.running))
        assert llm.cache.sinks.rows_in_use <= 2
    assert peak == 2
