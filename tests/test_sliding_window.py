"""Sliding-window layers (issue 16, item 2): the config, the model, the paged backends, the engine.

The convention under test (transformers' `sliding_window_overlay`): with window W, a query at
position (cache index) p sees the keys at j with p - W < j <= p. Every check is against a brute
force that applies that definition key by key, in float64; an off-by-one in any mask (W - 1 or
W + 1 keys) fails them (W = 1 and contexts of exactly W, W + 1 tokens are in every sweep).
"""
import dataclasses
import json
import math

import pytest
import torch
from helpers import DEVICE, GREEDY, gather, random_paged
from hypothesis import given, settings
from hypothesis import strategies as st

import kvlab
from kvlab.attention import accepts_sliding_window, paged_cpu, paged_torch
from kvlab.cache.base import NoCache
from kvlab.cache.contiguous import ConcatKVCache, ContiguousKVCache
from kvlab.cache.paged import PagedKVCache
from kvlab.generate import generate
from kvlab.model.config import LlamaConfig
from kvlab.model.fast import FastLlama
from kvlab.model.presets import GEMMA2_TINY, MISTRAL_TINY, random_model

BACKENDS = {"torch": paged_torch, "cpu": paged_cpu}


# ---- brute force ---------------------------------------------------------------------------------
def brute_attention(q, k, v, q_pos, window, scale):
    """One query q [Hq, D] at position q_pos over k, v [L, Hkv, D] (position j = row j), float64:
    the keys j with j <= q_pos and (no window or j > q_pos - window), one by one."""
    Hq, Hkv = q.shape[0], k.shape[1]
    seen = [j for j in range(k.shape[0]) if j <= q_pos and (window is None or j > q_pos - window)]
    out = torch.zeros(Hq, q.shape[1], dtype=torch.float64)
    for h in range(Hq):
        kv_head = h // (Hq // Hkv)
        scores = torch.stack([q[h].double() @ k[j, kv_head].double() * scale for j in seen])
        p = torch.softmax(scores, 0)
        out[h] = sum(p[i] * v[j, kv_head].double() for i, j in enumerate(seen))
    return out


def brute_prefill(q, k, v, bt, ctx_lens, q_lens, window, scale):
    rows, start = [], 0
    for s, (n, ql) in enumerate(zip(ctx_lens, q_lens)):
        ks, vs = gather(k, bt[s], n).cpu(), gather(v, bt[s], n).cpu()
        rows += [brute_attention(q[start + i].cpu(), ks, vs, n - ql + i, window, scale) for i in range(ql)]
        start += ql
    return torch.stack(rows)


def prefill_case(ctx_lens, q_lens, BS, Hq, Hkv, D, dtype, seed):
    k, v, bt, ctx = random_paged(ctx_lens, Hkv, D, BS, dtype=dtype, seed=seed)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(q_lens), Hq, D, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
    return q, k, v, bt, qsl, ctx


@pytest.fixture
def half_includes_float64(monkeypatch):
    """Send float64 through the CPU backend's grouped-rows decode, the path bfloat16 takes."""
    monkeypatch.setattr(paged_cpu, "HALF", (*paged_cpu.HALF, torch.float64))


# ---- the paged backends ----------------------------------------------------------------------------
DECODE_LENS = [1, 4, 5, 9, 16, 17, 40]
WINDOWS = [1, 2, 4, 5, 8, 16, 17, 100]


@pytest.mark.parametrize("name", ["torch", "cpu", "cpu-grouped"])
@pytest.mark.parametrize("window", WINDOWS)
def test_decode_equals_brute_force(request, name, window):
    if name == "cpu-grouped":
        request.getfixturevalue("half_includes_float64")
    ops, (BS, Hq, Hkv, D) = BACKENDS[name.split("-")[0]], (4, 6, 2, 8)
    k, v, bt, ctx = random_paged(DECODE_LENS, Hkv, D, BS, dtype=torch.float64, seed=window)
    q = torch.randn(len(DECODE_LENS), Hq, D, dtype=torch.float64)
    got = ops.paged_decode_attention(q, k, v, bt, ctx, 1 / math.sqrt(D), sliding_window=window)
    want = torch.stack([brute_attention(q[s], gather(k, bt[s], n), gather(v, bt[s], n), n - 1, window,
                                        1 / math.sqrt(D)) for s, n in enumerate(DECODE_LENS)])
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["torch", "cpu"])
@pytest.mark.parametrize("window", [1, 3, 4, 7, 20, 64])
def test_prefill_equals_brute_force(name, window):
    """Whole prompts, chunks over a cached prefix (shorter and longer than the window), one token,
    an empty row range, in one packed batch."""
    ctx_lens, q_lens, D = [7, 1, 20, 16, 30, 5, 9, 33], [7, 1, 3, 16, 1, 0, 8, 12], 8
    q, k, v, bt, qsl, ctx = prefill_case(ctx_lens, q_lens, 4, 6, 2, D, torch.float64, seed=window)
    got = BACKENDS[name].paged_prefill_attention(q, k, v, bt, qsl, ctx, 1 / math.sqrt(D), sliding_window=window)
    want = brute_prefill(q, k, v, bt, ctx_lens, q_lens, window, 1 / math.sqrt(D))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), BS=st.sampled_from([1, 2, 4, 16]), heads=st.sampled_from([(4, 4), (6, 2), (3, 1)]),
       window=st.integers(1, 24), name=st.sampled_from(["torch", "cpu"]))
def test_prefill_and_decode_property(data, BS, heads, window, name):
    """Random batches: any block size, GQA group, window; each sequence a context and a chunk."""
    ctx_lens = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=4))
    q_lens = [data.draw(st.integers(1, n)) for n in ctx_lens]
    (Hq, Hkv), D, scale = heads, 4, 0.5
    q, k, v, bt, qsl, ctx = prefill_case(ctx_lens, q_lens, BS, Hq, Hkv, D, torch.float64, seed=window)
    ops = BACKENDS[name]
    got = ops.paged_prefill_attention(q, k, v, bt, qsl, ctx, scale, sliding_window=window)
    torch.testing.assert_close(got, brute_prefill(q, k, v, bt, ctx_lens, q_lens, window, scale),
                               atol=1e-10, rtol=0)
    last = qsl[1:].long() - 1                                  # each sequence's last row as a decode query
    got = ops.paged_decode_attention(q[last], k, v, bt, ctx, scale, sliding_window=window)
    torch.testing.assert_close(got, brute_prefill(q, k, v, bt, ctx_lens, q_lens, window, scale)[last],
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_blocks_before_the_window_are_never_read(name):
    """Blocks wholly before every query's window hold NaN: the outputs stay finite and exact.
    (Physical block 0 stays finite: a -1 entry of a block table reads it, masked, in every backend.)"""
    BS, window, D = 4, 6, 8
    ctx_lens, q_lens = [30, 25], [3, 1]
    q, k, v, bt, qsl, ctx = prefill_case(ctx_lens, q_lens, BS, 4, 2, D, torch.float64, seed=3)
    want = brute_prefill(q, k, v, bt, ctx_lens, q_lens, window, 1 / math.sqrt(D))
    for s, (n, ql) in enumerate(zip(ctx_lens, q_lens)):
        dead = bt[s, :(n - ql - window + 1) // BS].long()   # blocks ending before the first query's window
        assert dead.numel() >= 4
        dead = dead[dead != 0]
        k[dead], v[dead] = float("nan"), float("nan")
    ops = BACKENDS[name]
    got = ops.paged_prefill_attention(q, k, v, bt, qsl, ctx, 1 / math.sqrt(D), sliding_window=window)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    last = qsl[1:].long() - 1
    got = ops.paged_decode_attention(q[last], k, v, bt, ctx, 1 / math.sqrt(D), sliding_window=window)
    torch.testing.assert_close(got, want[last], atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_no_window_is_the_default_path(name):
    """sliding_window=None is the call without the keyword, bit for bit; a window at least as long
    as every context changes nothing."""
    ctx_lens, q_lens, D = [7, 20, 13], [7, 3, 1], 8
    q, k, v, bt, qsl, ctx = prefill_case(ctx_lens, q_lens, 4, 6, 2, D, torch.float64, seed=5)
    ops, scale = BACKENDS[name], 1 / math.sqrt(D)
    plain = ops.paged_prefill_attention(q, k, v, bt, qsl, ctx, scale)
    assert torch.equal(ops.paged_prefill_attention(q, k, v, bt, qsl, ctx, scale, sliding_window=None), plain)
    torch.testing.assert_close(ops.paged_prefill_attention(q, k, v, bt, qsl, ctx, scale, sliding_window=20),
                               plain, atol=1e-12, rtol=0)
    dq = q[qsl[1:].long() - 1]
    plain = ops.paged_decode_attention(dq, k, v, bt, ctx, scale)
    assert torch.equal(ops.paged_decode_attention(dq, k, v, bt, ctx, scale, sliding_window=None), plain)
    torch.testing.assert_close(ops.paged_decode_attention(dq, k, v, bt, ctx, scale, sliding_window=20),
                               plain, atol=1e-12, rtol=0)


def test_cpu_backend_bfloat16_close_to_brute_force():
    BS, D, window = 4, 16, 5
    k, v, bt, ctx = random_paged(DECODE_LENS, 2, D, BS, dtype=torch.bfloat16, seed=9)
    q = torch.randn(len(DECODE_LENS), 8, D).bfloat16()
    got = paged_cpu.paged_decode_attention(q, k, v, bt, ctx, 0.25, sliding_window=window)
    want = torch.stack([brute_attention(q[s], gather(k, bt[s], n), gather(v, bt[s], n), n - 1, window, 0.25)
                        for s, n in enumerate(DECODE_LENS)])
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=0)


def test_triton_backend_equals_brute_force():
    """The Triton kernel (the CPU interpreter here), float32, several partitions per sequence."""
    pytest.importorskip("triton", reason="Triton is Linux-only")
    from kvlab.attention import paged_triton
    from kvlab.kernels.decode_attention_v3 import paged_decode_attention_v3

    ctx_lens, q_lens, D, BS = [70, 1, 17, 40], [5, 1, 17, 1], 16, 4
    q, k, v, bt, qsl, ctx = prefill_case(ctx_lens, q_lens, BS, 4, 2, D, torch.float32, seed=2)
    for window in (1, 5, 16, 17, 64):
        want = brute_prefill(q, k, v, bt, ctx_lens, q_lens, window, 0.25)
        got = paged_triton.paged_prefill_attention(q, k, v, bt, qsl, ctx, 0.25, sliding_window=window)
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=0)
        last = qsl[1:].long() - 1
        got = paged_decode_attention_v3(q[last].contiguous(), k, v, bt, ctx, 0.25, partition_size=16,
                                        block_n=16, sliding_window=window)
        torch.testing.assert_close(got.cpu().double(), want[last.cpu()], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="sliding_window must be an integer >= 1"):
        paged_triton.paged_decode_attention(q[:4], k, v, bt, ctx, 0.25, sliding_window=0)


# ---- the model -------------------------------------------------------------------------------------
class LoopAttention:
    """A cache that attends key by key (`brute_attention`): the dense reference with the window mask."""

    def __init__(self, windows):
        self.sliding_windows = windows

    def attend(self, layer, q, k, v):
        w, scale = self.sliding_windows[layer], 1 / math.sqrt(q.shape[-1])
        return torch.stack([brute_attention(q[0, t], k[0], v[0], t, w, scale)
                            for t in range(q.shape[1])])[None].to(q.dtype)

    def advance(self, n):
        pass


@pytest.mark.parametrize("shape", [MISTRAL_TINY, GEMMA2_TINY])
@pytest.mark.parametrize("window", [1, 4, 5])
def test_model_equals_a_loop_based_reference(shape, window):
    model = random_model(shape, seed=window, dtype=torch.float64, sliding_window=window)
    ids = torch.randint(0, 256, (1, 13), generator=torch.Generator().manual_seed(window))
    want = model(ids, cache=LoopAttention(model.config.sliding_windows))
    torch.testing.assert_close(model(ids), want, atol=1e-9, rtol=0)
    plain = random_model(shape, seed=window, dtype=torch.float64, sliding_window=None, layer_types=None)
    assert (plain(ids) - want).abs().max() > 1e-3                 # the window does change the logits
    torch.testing.assert_close(plain(ids[:, :window]), want[:, :window], atol=1e-9, rtol=0)


@pytest.mark.parametrize("shape", [MISTRAL_TINY, GEMMA2_TINY])
def test_caches_and_fast_model_apply_the_window(shape):
    """Prefill then one token at a time through the contiguous caches (and FastLlama) gives the
    logits of a full recompute; a cache that does not apply the windows is refused. (FastLlama
    rotates in float32, so it matches to 1e-5, as in tests/test_model_fast.py; the window moves the
    logits by far more, see above.)"""
    model = random_model(shape, seed=1, dtype=torch.float64, sliding_window=3)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    want = model(ids)
    for m, tol in ((model, 1e-9), (FastLlama(model), 1e-5)):
        torch.testing.assert_close(m(ids), want, atol=tol, rtol=0)
        for cache in (ContiguousKVCache.for_model(m, batch=2, max_len=16), ConcatKVCache.for_model(m)):
            got = [m(ids[:, :5], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(5, 11)]
            torch.testing.assert_close(torch.cat(got, 1), want, atol=tol, rtol=0)
    with pytest.raises(ValueError, match="sliding-window layers"):
        model(ids, cache=NoCache())
    with pytest.raises(ValueError, match="sliding-window layers"):
        model(ids, cache=ContiguousKVCache(4, 2, shape.num_kv_heads, 16, 16, dtype=torch.float64))


# ---- the engine --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [MISTRAL_TINY, GEMMA2_TINY])
@pytest.mark.parametrize("backend,chunked", [("torch", False), ("torch", True), ("cpu", True), ("triton", True)])
def test_engine_generates_the_reference_tokens(shape, backend, chunked):
    """Greedy through kvlab.LLM (prefix hits on a shared head, chunks of 8 tokens, several blocks out
    of each window) equals kvlab.generate on the dense model with the window mask (float64; the
    Triton kernels run float32, in the interpreter here)."""
    if backend == "triton":
        pytest.importorskip("triton", reason="Triton is Linux-only")
    dtype = torch.float32 if backend == "triton" else torch.float64
    model = random_model(shape, seed=3, dtype=dtype, sliding_window=6).to(DEVICE if backend == "triton" else "cpu")
    g = torch.Generator().manual_seed(3)
    head = torch.randint(0, 256, (9,), generator=g).tolist()
    prompts = [head + torch.randint(0, 256, (n,), generator=g).tolist() for n in (2, 14, 25)]
    prompts.append(torch.randint(0, 256, (4,), generator=g).tolist())
    want = [generate(model, p, 10) for p in prompts]
    llm = kvlab.LLM(model, block_size=2, num_kv_blocks=80, max_model_len=64, max_num_seqs=4,
                    attention_backend=backend, enable_chunked_prefill=chunked,
                    max_num_batched_tokens=8 if chunked else None)
    assert llm.cache.sliding_windows == model.config.sliding_windows and 6 in model.config.sliding_windows
    outs = llm.generate(prompts, kvlab.SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    again = llm.generate(prompts[:2], kvlab.SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == want[:2]         # from the prefix cache
    assert again[1].num_cached_tokens > 6


@pytest.mark.parametrize("chunked", [False, True])
def test_a_window_budget_frees_the_blocks_out_of_a_mistral_window(chunked):
    """Every layer windowed (W = 6) and kv_eviction='window' with kv_budget_tokens=W: the blocks that
    fell out of the window go back to the pool (ceil(W / block_size) + 1 per decoding sequence at
    most), and the tokens are still the dense windowed model's (the kept entries are consecutive,
    so cache-index differences are position differences)."""
    from kvlab.engine.kv_eviction import max_blocks_per_sequence

    model = random_model("mistral-tiny", seed=4, dtype=torch.float64, sliding_window=6)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 17, 30)]
    want = [generate(model, p, 20) for p in prompts]
    llm = kvlab.LLM(model, block_size=2, num_kv_blocks=80, max_model_len=64, max_num_seqs=4,
                    kv_budget_tokens=6, kv_eviction="window", enable_chunked_prefill=chunked,
                    max_num_batched_tokens=8 if chunked else None)
    cap = max_blocks_per_sequence(llm.eviction, 2)
    seqs = [llm.engine.requests[llm.add_request(p, kvlab.SamplingParams(max_tokens=20, **GREEDY))]
            for p in prompts]
    while llm.has_unfinished_requests():
        llm.step()
        for seq in llm.scheduler.running:
            if len(seq) >= seq.num_prompt_tokens + 2:                   # decoded once
                assert len(seq.block_table) <= cap
    assert [s.completion_token_ids for s in seqs] == want
    assert max(s.num_evicted_tokens for s in seqs) > 20


def test_a_mistral_shaped_model_frees_its_out_of_window_blocks_by_itself():
    """No budget given: every layer windowed, so the engine keeps the window (at least one block)
    and lets older blocks go; a Gemma-shaped model (full layers too) keeps them all."""
    from kvlab.engine.kv_eviction import max_blocks_per_sequence

    model = random_model("mistral-tiny", seed=4, dtype=torch.float64, sliding_window=6)
    prompt = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    llm = kvlab.LLM(model, block_size=4, num_kv_blocks=40, max_model_len=64)
    assert llm.eviction.policy == "window" and llm.eviction.budget == 6
    rid = llm.add_request(prompt, kvlab.SamplingParams(max_tokens=24, **GREEDY))
    seq = llm.engine.requests[rid]
    while llm.has_unfinished_requests():
        llm.step()
        if not seq.is_finished and len(seq) >= seq.num_prompt_tokens + 2:
            assert len(seq.block_table) <= max_blocks_per_sequence(llm.eviction, 4)
    assert seq.completion_token_ids == generate(model, prompt, 24)
    gemma = kvlab.LLM(random_model("gemma2-tiny", dtype=torch.float64), block_size=4, num_kv_blocks=40,
                      max_model_len=64)
    assert gemma.eviction is None


def test_engine_refuses_what_does_not_apply_windows():
    model = random_model("mistral-tiny", dtype=torch.float64)
    with pytest.raises(ValueError, match="kv_cache_dtype='int8' with a model that has sliding-window"):
        kvlab.LLM(model, kv_cache_dtype="int8", num_kv_blocks=16, max_model_len=64)
    with pytest.raises(ValueError, match="kv_eviction='streaming' with a model that has sliding-window"):
        kvlab.LLM(model, kv_budget_tokens=32, kv_eviction="streaming", num_kv_blocks=16, max_model_len=64)

    class NoWindowBackend:
        reshape_and_cache = staticmethod(paged_torch.reshape_and_cache)

        def paged_decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, scale):
            return paged_torch.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)

        def paged_prefill_attention(self, q, k_cache, v_cache, block_tables, qsl, context_lens, scale):
            return paged_torch.paged_prefill_attention(q, k_cache, v_cache, block_tables, qsl, context_lens, scale)

    assert accepts_sliding_window(paged_torch) and not accepts_sliding_window(NoWindowBackend())
    with pytest.raises(ValueError, match="takes no sliding_window= keyword"):
        kvlab.LLM(model, attention_backend=NoWindowBackend(), num_kv_blocks=16, max_model_len=64)
    plain = random_model("mistral-tiny", dtype=torch.float64, sliding_window=None)
    kvlab.LLM(plain, attention_backend=NoWindowBackend(), num_kv_blocks=16, max_model_len=64)


def test_paged_cache_passes_the_keyword_for_windowed_layers_only():
    seen = []

    class Recording:
        reshape_and_cache = staticmethod(paged_torch.reshape_and_cache)

        def paged_decode_attention(self, *args, **kw):
            seen.append(kw.get("sliding_window", "absent"))
            return paged_torch.paged_decode_attention(*args, **kw)

        def paged_prefill_attention(self, *args, **kw):
            seen.append(kw.get("sliding_window", "absent"))
            return paged_torch.paged_prefill_attention(*args, **kw)

    model = random_model("gemma2-tiny", dtype=torch.float64, sliding_window=5)
    llm = kvlab.LLM(model, attention_backend=Recording(), block_size=4, num_kv_blocks=16, max_model_len=64)
    llm.generate([list(range(12))], kvlab.SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
    assert seen == [5, "absent", 5, "absent"] * 2                   # a prefill step, then one decode step
    with pytest.raises(ValueError, match="sliding_windows must have one entry per layer"):
        PagedKVCache(4, 8, 4, 2, 16, sliding_windows=[5, None])


# ---- the config --------------------------------------------------------------------------------------
def test_config_fields_and_defaults():
    assert LlamaConfig().sliding_windows is None                                    # no window: unchanged
    assert LlamaConfig(num_layers=3, sliding_window=8).sliding_windows == (8, 8, 8)  # Mistral: every layer
    cfg = LlamaConfig(num_layers=3, sliding_window=8,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    assert cfg.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert cfg.sliding_windows == (8, None, 8)
    hash(cfg)                                                                        # frozen, hashable
    assert LlamaConfig(num_layers=2, sliding_window=8, layer_types=["full_attention"] * 2).sliding_windows is None
    assert LlamaConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg   # the load cache's round trip


@pytest.mark.parametrize("kw,match", [
    (dict(sliding_window=0), r"sliding_window must be an integer >= 1"),
    (dict(sliding_window=-4), r"sliding_window must be an integer >= 1"),
    (dict(sliding_window=2.5), r"sliding_window must be an integer >= 1"),
    (dict(sliding_window=True), r"sliding_window must be an integer >= 1"),
    (dict(sliding_window=8, layer_types=["sliding_attention"] * 3), r"layer_types must have one entry per "
                                                                    r"layer \(num_layers=4\), got 3"),
    (dict(sliding_window=8, layer_types=["sliding_attention"] * 3 + ["chunked"]), r"layer_types entries must be"),
    (dict(layer_types=["sliding_attention"] * 4), r"sliding_window is None"),
    (dict(sliding_window=8, layer_types="sliding_attention"), r"layer_types must be a list"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(num_layers=4, **kw)


def test_hugging_face_configs(tmp_path):
    """A Mistral config.json brings its window (transformers' default 4096 when absent, none when
    null); a model windowed on every layer exports as Mistral, a mixed one is refused."""
    from kvlab.model.hf_export import hf_config
    from kvlab.model.hf_loader import config_from_hf

    exported = hf_config(MISTRAL_TINY)
    assert exported["model_type"] == "mistral" and exported["sliding_window"] == 16
    (tmp_path / "config.json").write_text(json.dumps(exported))
    assert config_from_hf(str(tmp_path)).sliding_windows == MISTRAL_TINY.sliding_windows
    for value, want in ((None, None), ("absent", 4096)):
        c = dict(exported)
        if value == "absent":
            del c["sliding_window"]
        else:
            c["sliding_window"] = value
        (tmp_path / "config.json").write_text(json.dumps(c))
        assert config_from_hf(str(tmp_path)).sliding_window == want
    with pytest.raises(ValueError, match="mixes sliding_attention and full_attention"):
        hf_config(GEMMA2_TINY)
    assert hf_config(LlamaConfig())["model_type"] == "llama"


def test_memory_calculator_reads_the_windows():
    """kvlab.costs counts a windowed LlamaConfig as it counts the published Mistral and Gemma 2."""
    from kvlab.costs.memory import kv_bytes_per_token, kv_cache_bytes

    per_layer = kv_bytes_per_token(MISTRAL_TINY) // MISTRAL_TINY.num_layers
    assert kv_cache_bytes(MISTRAL_TINY, 100) == kv_cache_bytes(MISTRAL_TINY, 16) == 4 * 16 * per_layer
    per_layer = kv_bytes_per_token(GEMMA2_TINY) // GEMMA2_TINY.num_layers
    assert kv_cache_bytes(GEMMA2_TINY, 100) == per_layer * (2 * 100 + 2 * 16)
    assert kv_cache_bytes(LlamaConfig(), 100) == 100 * kv_bytes_per_token(LlamaConfig())
