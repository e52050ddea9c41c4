"""Static vs continuous batching drivers on the engine (tiny random model): same tokens, the batching
rules each mode promises, the trace clock, and the shortest-prompt-first policy."""
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvlab
from kvlab.engine.sequence import Sequence
from kvlab.lab.batching import random_prompts, serve, shortest_prompt_first
from kvlab.lab.traces import Request, make_trace

SLOTS = 4


def _engine(model, **kw):
    args = dict(block_size=4, max_num_seqs=SLOTS, enable_prefix_caching=False, max_model_len=128)
    args.update(kw)
    return kvlab.LLM(model=model, **args)


def _workload(trace, vocab=256):
    prompts = random_prompts(trace, vocab, seed=0, low=3)
    params = [kvlab.SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in trace]
    return prompts, params


@pytest.fixture(scope="module")
def trace():
    """Ten requests that all arrive at once (in id order): the batching rules do not then depend on
    how fast this machine runs (with arrivals 10 ms apart, a quiet machine finished each request
    before the next arrived and no batch ever formed)."""
    return [Request(i, 0.0, 2 + (7 * i) % 13, 1 + (5 * i) % 11) for i in range(10)]


def test_both_modes_produce_the_tokens_of_one_request_at_a_time(tiny_model, trace):
    prompts, params = _workload(trace)
    ref = [o.outputs[0].token_ids for o in
           (_engine(tiny_model).generate([p], q, use_tqdm=False)[0] for p, q in zip(prompts, params))]
    for mode in ("static", "continuous"):
        res = serve(_engine(tiny_model), trace, prompts, params, mode=mode, num_slots=SLOTS)
        assert [res.outputs[r.request_id] for r in trace] == ref, mode
        for t, r in zip(sorted(res.timings, key=lambda x: x.request_id), trace):
            assert t.num_output_tokens == r.output_len
            assert t.arrival <= t.first_token <= t.finish and t.ttft >= 0
            assert t.first_step <= t.finish_step and t.finish_step - t.first_step == r.output_len - 1


def test_static_admits_a_group_only_after_the_previous_one_finished(tiny_model, trace):
    prompts, params = _workload(trace)
    res = serve(_engine(tiny_model), trace, prompts, params, mode="static", num_slots=SLOTS)
    groups = {}
    for t in res.timings:
        groups.setdefault(t.first_step, []).append(t)
    starts = sorted(groups)
    for a, b in zip(starts, starts[1:]):
        assert len(groups[a]) <= SLOTS
        assert max(t.finish_step for t in groups[a]) < b   # the next group starts after the last finish
    assert np.all(np.diff(res.step_active[: starts[1]]) <= 0)  # a group only shrinks
    assert res.idle_slots.sum() > 0                              # finished slots idled while others waited


def test_continuous_never_idles_a_slot_while_a_request_waits(tiny_model, trace):
    prompts, params = _workload(trace)
    res = serve(_engine(tiny_model), trace, prompts, params, mode="continuous", num_slots=SLOTS)
    assert res.step_active.max() <= SLOTS
    assert res.idle_slots.sum() == 0
    static = serve(_engine(tiny_model), trace, prompts, params, mode="static", num_slots=SLOTS)
    assert len(res.step_active) < len(static.step_active)       # fewer steps for the same tokens
    total = sum(r.output_len for r in trace)
    assert res.summary()["output_tokens"] == static.summary()["output_tokens"] == total


def test_the_clock_jumps_over_idle_gaps(tiny_model):
    trace = [Request(i, 1000.0 * i, 3, 2) for i in range(3)]   # 2000 s of trace
    prompts, params = _workload(trace)
    t0 = time.perf_counter()
    res = serve(_engine(tiny_model), trace, prompts, params, mode="continuous", num_slots=SLOTS)
    assert time.perf_counter() - t0 < 60
    for t in res.timings:
        assert t.first_token >= t.arrival and t.ttft < 60          # no request waits for the gap
    assert res.summary()["makespan_s"] >= 2000


def test_a_tiny_pool_preempts_and_changes_no_token(tiny_model):
    trace = make_trace(6, seed=0)
    trace = [Request(r.request_id, 0.0, 6, 20) for r in trace]
    prompts, params = _workload(trace)
    ample = serve(_engine(tiny_model), trace, prompts, params, "continuous", SLOTS)
    llm = _engine(tiny_model, num_kv_blocks=12)                   # 4 sequences of 26 tokens need 28
    tight = serve(llm, trace, prompts, params, "continuous", SLOTS)
    assert llm.get_metrics()["num_preemptions"] > 0
    assert tight.outputs == ample.outputs
    assert llm.block_manager.num_free_blocks == 12                 # every block came back


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=0, max_size=12))
def test_shortest_prompt_first_is_a_stable_sort_by_prompt_length(lengths):
    seqs = [Sequence([5] * n) for n in lengths]
    out = shortest_prompt_first(list(seqs))
    assert sorted(s.seq_id for s in out) == sorted(s.seq_id for s in seqs)   # a reordering
    assert [s.num_prompt_tokens for s in out] == sorted(lengths)
    for a, b in zip(out, out[1:]):                                          # ties keep queue order
        if a.num_prompt_tokens == b.num_prompt_tokens:
            assert seqs.index(a) < seqs.index(b)


def test_shortest_prompt_first_in_the_engine_lowers_mean_ttft(tiny_model):
    """All requests at once, one slot, long prompts with long answers: SPF serves the short ones
    first, so they stop waiting behind the long ones; every request gets the same tokens."""
    shapes = [(60, 8), (50, 8), (40, 8), (3, 1), (2, 1), (1, 1)]        # (prompt, output)
    trace = [Request(i, 0.0, n, o) for i, (n, o) in enumerate(shapes)]
    prompts, params = _workload(trace)
    fcfs = serve(_engine(tiny_model, max_num_seqs=1), trace, prompts, params, "continuous", 1)
    spf = serve(_engine(tiny_model, max_num_seqs=1, scheduling_policy=shortest_prompt_first), trace,
                prompts, params, "continuous", 1)
    assert spf.outputs == fcfs.outputs
    order = [t.request_id for t in sorted(spf.timings, key=lambda t: t.first_step)]
    assert order == [5, 4, 3, 2, 1, 0]
    steps = lambda res: np.mean([t.first_step for t in res.timings])
    assert steps(fcfs) == np.mean([0, 8, 16, 24, 25, 26]) and steps(spf) == np.mean([0, 1, 2, 3, 11, 19])


def test_random_prompts_are_seeded_and_in_range():
    trace = [Request(i, 0.0, n, 1) for i, n in enumerate([1, 5, 9])]
    a, b = random_prompts(trace, 300, seed=1), random_prompts(trace, 300, seed=1)
    assert a == b and [len(p) for p in a] == [1, 5, 9]
    assert all(100 <= t < 300 for p in a for t in p)
    with pytest.raises(ValueError, match="low"):
        random_prompts(trace, 50)


def test_bad_input_names_the_argument(tiny_model, trace):
    prompts, params = _workload(trace)
    llm = _engine(tiny_model)
    with pytest.raises(ValueError, match="mode"):
        serve(llm, trace, prompts, params, mode="dynamic")
    with pytest.raises(ValueError, match="num_slots"):
        serve(llm, trace, prompts, params, num_slots=0)
    with pytest.raises(ValueError, match="one entry per request"):
        serve(llm, trace, prompts[:-1], params)
    with pytest.raises(ValueError, match="empty"):
        serve(llm, [], [], [])
    llm.add_request(prompts[0], params[0])
    with pytest.raises(ValueError, match="idle engine"):
        serve(llm, trace, prompts, params)
