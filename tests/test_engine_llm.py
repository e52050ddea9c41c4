"""kvlab.LLM end to end on the tiny model (float64, so greedy ties cannot flip) and the real one.

The reference is `kvlab.generate` with the contiguous cache, one prompt at a time: the paged
engine must produce the same greedy tokens whatever the batch, block size or preemptions.
"""

import pytest
from helpers import GREEDY
from helpers import assert_all_free as _assert_all_free
from helpers import random_prompts as _prompts

import kvlab
from kvlab import LLM, SamplingParams


@pytest.mark.parametrize("block_size,num_blocks", [(16, 64), (4, 24), (1, 90), (128, 4)])
def test_greedy_batch_equals_reference(model64, reference, block_size, num_blocks):
    prompts = _prompts([3, 17, 40, 1, 9, 33])
    max_tokens = [12, 5, 9, 16, 1, 12]
    llm = LLM(model64, block_size=block_size, num_kv_blocks=num_blocks, max_model_len=256)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=n, **GREEDY) for n in max_tokens], use_tqdm=False)
    for o, p, n in zip(outs, prompts, max_tokens):
        assert o.prompt_token_ids == p
        assert o.outputs[0].token_ids == reference(p, n)
        assert o.outputs[0].finish_reason == "length" and o.finished
        assert o.arrival_time <= o.first_token_time <= o.finish_time
    _assert_all_free(llm)


def test_tiny_pool_forces_preemption_and_outputs_stay_equal(model64, reference):
    prompts = _prompts([10, 12, 7, 15, 9], seed=1)
    llm = LLM(model64, block_size=4, num_kv_blocks=9, max_model_len=64)
    outs = llm.generate(prompts, SamplingParams(max_tokens=14, **GREEDY), use_tqdm=False)
    assert llm.get_metrics()["num_preemptions"] > 0
    assert [o.outputs[0].token_ids for o in outs] == [reference(p, 14) for p in prompts]
    _assert_all_free(llm)


def test_streaming_add_step_abort(model64, reference):
    llm = LLM(model64, block_size=4, num_kv_blocks=32, max_model_len=128)
    a = llm.add_request(_prompts([5])[0], SamplingParams(max_tokens=8, **GREEDY), request_id="a")
    b = llm.add_request(_prompts([11], seed=2)[0], SamplingParams(max_tokens=30, **GREEDY))
    streamed = {a: [], b: []}
    steps = 0
    while llm.has_unfinished_requests():
        for out in llm.step():
            streamed[out.request_id] += out.new_token_ids
            assert out.outputs[0].token_ids == streamed[out.request_id]
        steps += 1
        if steps == 3:      # a third request arrives mid-flight and joins the running batch
            c = llm.add_request(_prompts([6], seed=3)[0], SamplingParams(max_tokens=4, **GREEDY))
            streamed[c] = []
        if steps == 10:
            llm.abort_request(b)
            assert llm.block_manager.num_free_blocks > 0
    assert streamed[a] == reference(_prompts([5])[0], 8)
    assert streamed[c] == reference(_prompts([6], seed=3)[0], 4)
    assert streamed[b] == reference(_prompts([11], seed=2)[0], 30)[:len(streamed[b])] and len(streamed[b]) < 30
    _assert_all_free(llm)
    assert llm.get_metrics()["num_requests_finished"] == 3


def test_bad_requests_are_rejected_and_the_rest_is_served(model64, reference):
    llm = LLM(model64, block_size=4, num_kv_blocks=8, max_model_len=64)
    good = _prompts([6, 9], seed=4)
    for p in good:
        llm.add_request(p, SamplingParams(max_tokens=6, **GREEDY))
    llm.step()
    bad = [([], {}, "empty"),
           ([1, 256], {}, r"\[0, 256\)"),
           ([-1], {}, r"\[0, 256\)"),
           ([1] * 64, {}, "max_model_len is 64"),
           ([1] * 30, dict(max_tokens=20), "num_kv_blocks=8"),
           ("text", {}, "tokenizer")]
    for prompt, kw, match in bad:
        with pytest.raises(ValueError, match=match):
            llm.add_request(prompt, SamplingParams(**kw))
    with pytest.raises(ValueError, match="prompt 1"):
        llm.generate([[1, 2], []], use_tqdm=False)
    outs = {}
    while llm.has_unfinished_requests():
        for o in llm.step():
            outs[o.request_id] = o.outputs[0].token_ids
    assert sorted(outs.values()) == sorted(reference(p, 6) for p in good)
    _assert_all_free(llm)


@pytest.mark.parametrize("kw,match", [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.1), "temperature"),
                                      (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                      (dict(top_k=0), "top_k")])
def test_bad_sampling_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


@pytest.mark.parametrize("kw,match", [(dict(block_size=12), "power of two"), (dict(block_size=0), "power of two"),
                                      (dict(kv_cache_dtype="int3"), "auto.*int8.*fp8.*int4.*int2"),
                                      (dict(attention_backend="cuda"), "attention_backend"),
                                      (dict(max_model_len=10_000), "max_model_len"),
                                      (dict(max_model_len=64, max_num_batched_tokens=32), "max_num_batched_tokens"),
                                      (dict(num_kv_blocks=0), "num_kv_blocks"),
                                      (dict(kv_cache_memory_bytes=10), "one block")])
def test_bad_engine_arguments(tiny_model, kw, match):
    with pytest.raises(ValueError, match=match):
        LLM(tiny_model, **kw)


def test_stop_tokens_eos_and_max_model_len(model64, reference):
    p = _prompts([5], seed=5)[0]
    full = reference(p, 10)
    llm = LLM(model64, block_size=4, num_kv_blocks=16, max_model_len=12)
    o = llm.generate(p, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[full[3]]), use_tqdm=False)[0]
    assert o.outputs[0].token_ids == full[:full.index(full[3]) + 1] and o.outputs[0].finish_reason == "stop"
    o = llm.generate(p, SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)[0]
    assert o.outputs[0].token_ids == full[:7] and o.outputs[0].finish_reason == "length"   # 5 + 7 = 12
    llm.eos_token_id = full[2]
    o = llm.generate(p, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert o.outputs[0].token_ids == full[:full.index(full[2]) + 1]
    _assert_all_free(llm)


def test_seeded_sampling_does_not_depend_on_the_batch(model64):
    p = _prompts([7], seed=6)[0]
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=12, seed=123, ignore_eos=True)
    alone = LLM(model64, block_size=4, num_kv_blocks=32, max_model_len=64).generate(p, sp, use_tqdm=False)
    batch = LLM(model64, block_size=4, num_kv_blocks=32, max_model_len=64).generate(
        _prompts([3, 9], seed=7) + [p], [SamplingParams(temperature=1.0, max_tokens=5)] * 2 + [sp], use_tqdm=False)
    assert alone[0].outputs[0].token_ids == batch[2].outputs[0].token_ids


def test_metrics_and_prometheus(model64):
    llm = LLM(model64, block_size=4, num_kv_blocks=9, max_model_len=64)
    llm.add_request(_prompts([10])[0], SamplingParams(max_tokens=3, **GREEDY))
    llm.add_request(_prompts([20], seed=1)[0], SamplingParams(max_tokens=3, **GREEDY))
    m = llm.get_metrics()
    assert (m["num_requests_waiting"], m["num_requests_running"], m["kv_cache_usage_perc"]) == (2, 0, 0.0)
    llm.step()
    m = llm.get_metrics()
    assert m["num_requests_running"] == 2 and m["kv_cache_usage_perc"] == pytest.approx(8 / 9)
    assert m["prefix_cache_queries"] == 30 and m["prompt_tokens"] == 30
    while llm.has_unfinished_requests():
        llm.step()
    m = llm.get_metrics()
    assert m["time_to_first_token_seconds"].count == 2 and m["time_per_output_token_seconds"].count == 2
    assert m["generation_tokens"] == 6
    text = llm.prometheus_metrics()
    for name in ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting",
                 "num_preemptions_total", "prefix_cache_hits_total"):
        assert f"kvlab:{name} " in text
    assert 'kvlab:time_to_first_token_seconds_bucket{le="+Inf"} 2' in text


def test_scheduling_policy_orders_admission(model64):
    order = []
    shortest_first = lambda waiting: sorted(waiting, key=len)   # noqa: E731
    llm = LLM(model64, block_size=4, num_kv_blocks=64, max_model_len=64, max_num_seqs=1,
              scheduling_policy=shortest_first)
    prompts = _prompts([9, 2, 5], seed=8)
    for p in prompts:
        llm.add_request(p, SamplingParams(max_tokens=2, **GREEDY), request_id=str(len(p)))
    while llm.has_unfinished_requests():
        order += [o.request_id for o in llm.step() if o.finished]
    assert order == ["2", "5", "9"]


def test_real_model_batch_equals_reference_and_chat(real_model):
    model, tok = real_model
    llm = LLM((model, tok), block_size=16, num_kv_blocks=16, max_model_len=128)
    prompts = ["The capital of France is", "1, 2, 3,"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    for o, text in zip(outs, prompts):
        ids = tok.encode(text)
        assert o.prompt_token_ids == ids
        assert o.outputs[0].token_ids == kvlab.generate(model, ids, 6, eos_token_id=llm.eos_token_id)
        assert o.outputs[0].text == tok.decode(o.outputs[0].token_ids, skip_special_tokens=True)
    stop = outs[1].outputs[0].text[2:4]
    o = llm.generate(prompts[1], SamplingParams(temperature=0, max_tokens=6, stop=stop), use_tqdm=False)[0]
    assert o.outputs[0].finish_reason == "stop" and o.outputs[0].text == outs[1].outputs[0].text[:2]
    o = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=3),
                 use_tqdm=False)[0]
    assert o.prompt_token_ids[-3:] == tok.encode("<|im_start|>assistant\n")[-3:] and o.outputs[0].token_ids
    _assert_all_free(llm)


def test_pool_sizing_from_memory_bytes(tiny_model):
    cfg = tiny_model.config
    per_block = 2 * cfg.num_layers * 8 * cfg.num_kv_heads * cfg.head_dim * 4
    llm = LLM(tiny_model, block_size=8, kv_cache_memory_bytes=10 * per_block + 5, max_model_len=64)
    assert llm.bytes_per_block == per_block and llm.num_kv_blocks == 10
    assert llm.cache.k_cache[0].shape == (10, 8, cfg.num_kv_heads, cfg.head_dim)


def test_triton_backend_matches_torch(tiny_model):
    """The engine only swaps the three attention functions (Triton's CPU interpreter here)."""
    pytest.importorskip("triton")
    prompts = _prompts([3, 17], seed=9)
    sp = SamplingParams(max_tokens=4, **GREEDY)
    outs = {b: [o.outputs[0].token_ids for o in LLM(tiny_model, block_size=16, num_kv_blocks=8,
                                                     max_model_len=64, attention_backend=b)
                .generate(prompts, sp, use_tqdm=False)] for b in ("torch", "triton")}
    assert outs["triton"] == outs["torch"]
