"""kvlab.engine.trace: the tracer records what the engine did and changes nothing it does.

Checked on the tiny model in float64 against the same engine run untraced: identical tokens; each
record's slots follow from its block tables; free-block counts, queue lengths and preemptions match
the engine's own state; prefix-cache hits show up as a later start and shared leading blocks.
"""

import pytest
from helpers import GREEDY
from helpers import random_prompts as _prompts

from kvlab import LLM, SamplingParams
from kvlab.engine.model_runner import ModelRunner
from kvlab.engine.trace import EngineTracer, TracingRunner


def _run(llm, prompts, max_tokens, tracer=None):
    ids = [llm.add_request(p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in zip(prompts, max_tokens)]
    out = {i: [] for i in ids}
    records = []
    while llm.has_unfinished_requests():
        if tracer is None:
            outs = llm.step()
            for o in outs:
                out[o.request_id] += o.new_token_ids
        else:
            rec = tracer.step()
            records.append(rec)
            for rid, tok in rec.tokens.items():
                out[rid].append(tok)
    return [out[i] for i in ids], records


def test_tracing_changes_no_token_and_records_every_step(model64):
    prompts, max_tokens = _prompts([5, 13, 9, 2], seed=1), [12, 10, 12, 14]
    plain, _ = _run(LLM(model64, block_size=4, num_kv_blocks=10, max_model_len=64), prompts, max_tokens)
    llm = LLM(model64, block_size=4, num_kv_blocks=10, max_model_len=64)
    with EngineTracer(llm) as tracer:
        assert isinstance(llm.runner, TracingRunner)
        traced, records = _run(llm, prompts, max_tokens, tracer)
    assert type(llm.runner) is ModelRunner            # detached
    assert traced == plain
    assert records == tracer.records and [r.step for r in records] == list(range(len(records)))
    assert records[-1].num_preemptions == llm.scheduler.num_preemptions > 0   # the small pool preempts
    for rec in records:
        assert rec.num_batched_tokens == sum(len(s.slots) for s in rec.seqs)
        assert rec.is_decode == all(s.num_new_tokens == 1 for s in rec.seqs)
        assert 0 <= rec.num_free_blocks <= rec.num_free_blocks_after <= 10
        assert set(rec.tokens) == {s.request_id for s in rec.seqs}
        for s in rec.seqs:
            assert len(s.block_table) == -(-s.end // 4)
            assert s.slots == [s.block_table[p // 4] * 4 + p % 4 for p in range(s.start, s.end)]
        used = {b for s in rec.seqs for b in s.block_table}
        assert rec.num_free_blocks == 10 - len(used)      # no prefix sharing between random prompts
        assert 0 <= rec.num_running <= 4 and rec.num_running == len(rec.seqs)
    phases = [s.phase for r in records for s in r.seqs]
    assert phases.count("prefill") == len(prompts) + records[-1].num_preemptions
    assert records[-1].num_free_blocks_after == 10 and not llm.has_unfinished_requests()
    finished = [rid for r in records for rid in r.finished]
    assert len(finished) == len(set(finished)) == len(prompts)           # each request finishes once


def test_prefix_hit_is_visible_in_the_record(model64):
    shared = _prompts([12], seed=3)[0]
    llm = LLM(model64, block_size=4, num_kv_blocks=16, max_model_len=64)
    tracer = EngineTracer(llm)
    a = llm.add_request(shared + [7, 8], SamplingParams(max_tokens=3, **GREEDY))
    first = tracer.step()
    b = llm.add_request(shared + [9], SamplingParams(max_tokens=2, **GREEDY))
    second = tracer.step()
    sa, sb = {s.request_id: s for s in second.seqs}[a], {s.request_id: s for s in second.seqs}[b]
    assert first.seqs[0].phase == "prefill" and first.seqs[0].start == 0 and first.seqs[0].end == 14
    assert sa.phase == "decode" and sa.num_new_tokens == 1
    assert sb.phase == "prefill" and sb.num_cached_tokens == sb.start == 12 and sb.end == 13
    assert sb.block_table[:3] == sa.block_table[:3] and sb.block_table[3] not in sa.block_table
    assert second.num_free_blocks == 16 - 4 - 1           # a: 4 blocks (15 tokens), b: 1 new block
    assert "cache hit 12" in second.describe() and "decode" in second.describe()
    while llm.has_unfinished_requests():
        tracer.step()
    assert tracer.records[-1].num_free_blocks_after == 16
    tracer.detach()
    again = EngineTracer(llm)
    with pytest.raises(ValueError, match="already has a tracer"):
        EngineTracer(llm)
    again.detach()


def test_records_also_come_from_generate(model64):
    llm = LLM(model64, block_size=8, num_kv_blocks=16, max_model_len=64)
    tracer = EngineTracer(llm)
    llm.generate(_prompts([3, 6]), SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    recs = tracer.records
    assert len(recs) == 4 and not recs[0].is_decode and all(r.is_decode for r in recs[1:])
    assert recs[0].tokens == {} and recs[0].num_free_blocks_after is None   # only step() fills these
    assert 0 < recs[0].kv_cache_usage <= 1
    assert tracer.step() is None                                            # nothing left to run
