"""Chunked prefill (Sarathi-Serve): prompts split over steps under a token budget, decodes first.

Against the reference: the same greedy tokens as whole-prompt prefill and as kvlab.generate; the
budget holds every step; running decodes get a token every step while a long prompt is chunked;
a prompt's blocks reach the prefix cache only once computed. Random workloads with chunking run
through the hypothesis test in tests/test_scheduler.py."""
import pytest
from helpers import GREEDY
from helpers import random_prompts as _prompts

from kvlab import LLM, SamplingParams
from kvlab.engine.model_runner import ModelRunner


class CountingRunner(ModelRunner):
    """Records, per step, each scheduled sequence's (request id, tokens computed)."""

    def __init__(self, model, cache):
        super().__init__(model, cache)
        self.steps = []

    def run(self, schedule):
        self.steps.append([(it.seq.request_id, it.num_tokens) for it in schedule.items])
        return super().run(schedule)


def _counting(llm):
    llm.runner = CountingRunner(llm.model, llm.cache)
    return llm.runner


@pytest.mark.parametrize("fmt", ["auto", "int8", "fp8"])
def test_chunked_equals_whole_prompt_prefill(model64, reference, fmt):
    prompts = _prompts([45, 7, 30, 61])
    sp = SamplingParams(max_tokens=8, **GREEDY)
    outs = {}
    for chunk in (None, 8, 13):
        llm = LLM(model64, block_size=4, num_kv_blocks=96, max_model_len=96, kv_cache_dtype=fmt,
                  max_num_seqs=4, max_num_batched_tokens=chunk, enable_chunked_prefill=chunk is not None)
        runner = _counting(llm)
        outs[chunk] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        assert llm.block_manager.num_free_blocks == llm.num_kv_blocks
        if chunk:
            assert max(sum(n for _, n in step) for step in runner.steps) <= chunk
            assert len(runner.steps) > 8 + sum(len(p) for p in prompts) // chunk - 1
    assert outs[8] == outs[13] == outs[None]
    if fmt == "auto":
        assert outs[None] == [reference(p, 8) for p in prompts]


def test_decodes_never_stall_behind_a_long_prompt(model64):
    """A request decoding when a 60-token prompt arrives gets one token in every step while the
    prompt is prefilled in chunks of at most budget - 1 tokens."""
    llm = LLM(model64, block_size=4, num_kv_blocks=64, max_model_len=96, max_num_batched_tokens=8,
              max_num_seqs=4, enable_chunked_prefill=True)
    runner = _counting(llm)
    a = llm.add_request(_prompts([5])[0], SamplingParams(max_tokens=30, **GREEDY))
    llm.step()
    b = llm.add_request(_prompts([60], seed=1)[0], SamplingParams(max_tokens=2, **GREEDY))
    produced = []
    while llm.has_unfinished_requests():
        produced.append({o.request_id for o in llm.step()})
    steps = runner.steps[1:]
    b_steps = [i for i, step in enumerate(steps) if any(r == b and n > 1 for r, n in step)]
    assert len(b_steps) == -(-60 // 7)                 # 60 prompt tokens, 7 a step beside a's decode
    for i in b_steps:
        assert (a, 1) in steps[i] and a in produced[i]  # a decoded in every one of them
        assert b not in produced[i] or i == b_steps[-1]  # b's first token after its last chunk
    whole = LLM(model64, block_size=4, num_kv_blocks=64, max_model_len=96)
    whole_runner = _counting(whole)
    whole.add_request(_prompts([5])[0], SamplingParams(max_tokens=30, **GREEDY))
    whole.step()
    whole.add_request(_prompts([60], seed=1)[0], SamplingParams(max_tokens=2, **GREEDY))
    whole.step()
    assert sum(n for _, n in whole_runner.steps[-1]) == 61   # without chunks: one 61-token step


def test_prefix_cache_sees_only_computed_blocks(model64, reference):
    """A prompt's blocks become findable in the step that computes them, not at admission; a second
    request with the same prompt, admitted beside the first one's last chunk, reuses them, and both
    get the reference tokens."""
    prompt = _prompts([40], seed=2)[0]
    llm = LLM(model64, block_size=4, num_kv_blocks=64, max_model_len=96, max_num_batched_tokens=24,
              max_num_seqs=4, enable_chunked_prefill=True)
    sp = SamplingParams(max_tokens=5, **GREEDY)
    first = llm.engine.requests[llm.add_request(prompt, sp)]
    llm.step()                                         # tokens 0..23 of 40
    assert len(llm.block_manager.cached) == 24 // 4
    second = llm.engine.requests[llm.add_request(prompt, sp)]
    llm.step()                                         # first: 24..39; second admitted with 8 left
    assert len(llm.block_manager.cached) == 40 // 4
    assert second.num_cached_tokens == 36   # all full blocks but the last token's
    while llm.has_unfinished_requests():
        llm.step()
    want = reference(prompt, 5)
    assert first.completion_token_ids == second.completion_token_ids == want


def test_budget_below_the_longest_prompt_needs_chunking(tiny_model):
    with pytest.raises(ValueError, match="enable_chunked_prefill=True"):
        LLM(tiny_model, max_model_len=64, max_num_batched_tokens=16, num_kv_blocks=8, max_num_seqs=4)
    llm = LLM(tiny_model, max_model_len=64, max_num_batched_tokens=16, num_kv_blocks=8,
              max_num_seqs=4, enable_chunked_prefill=True)
    out = llm.generate([_prompts([50])[0]], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_int4_chunks_finish_and_give_every_row_back(model64):
    """int4 seals a block in whichever chunk fills it; later chunks read it quantized (as decoding
    would), so tokens may differ from whole-prompt prefill, but every request finishes, every block
    and every residual row comes back."""
    llm = LLM(model64, block_size=4, num_kv_blocks=64, max_model_len=96, kv_cache_dtype="int4",
              max_num_seqs=4, max_num_batched_tokens=10, enable_chunked_prefill=True)
    outs = llm.generate(_prompts([45, 7, 30], seed=5), SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert llm.block_manager.num_free_blocks == llm.num_kv_blocks and llm.cache.num_residual_blocks == 0
