"""Generation: the cache changes the cost, never the result (real model), and sampling is exact."""
import pytest
import torch

import kvlab
from kvlab.generate import generate_batch, iter_generate, sample_next

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
N_NEW = 64


N_LOOP = 12  # the literal recompute-everything loop is run this far (it is quadratic)


@pytest.fixture(scope="module")
def runs(real_model):
    """For each prompt: N_NEW greedy steps with each cache, and the no-cache reference logits.

    The reference for step t is a no-cache forward over prompt + the first t tokens, read at its last
    position. Under the causal mask that is one forward over the whole generated sequence, read at
    every position; the literal step-by-step no-cache loop is also run for the first N_LOOP steps.
    """
    model, tok = real_model
    out = []
    for text in PROMPTS:
        ids = tok.encode(text)
        r = {kind: list(iter_generate(model, ids, N_NEW, cache=kind)) for kind in ("prealloc", "concat")}
        r["loop"] = list(iter_generate(model, ids, N_LOOP, use_cache=False))
        full = torch.tensor([ids + [s.token for s in r["prealloc"]]])
        with torch.inference_mode():
            ref = model(full)[0, len(ids) - 1:-1]  # logits that chose each new token
        out.append((ids, r, ref))
    return out


def test_cached_and_uncached_greedy_tokens_identical(runs):
    for ids, r, ref in runs:
        tokens = {name: [s.token for s in steps] for name, steps in r.items()}
        assert len(tokens["prealloc"]) == N_NEW
        assert tokens["prealloc"] == ref.argmax(-1).tolist(), ids
        assert tokens["concat"] == tokens["prealloc"], ids
        assert tokens["loop"] == tokens["prealloc"][:N_LOOP], ids


def test_cached_logits_within_1e4_at_every_step(runs, real_model):
    model, _ = real_model
    assert model.dtype == torch.float32
    for _, r, ref in runs:
        loop = torch.stack([s.logits for s in r["loop"]])
        assert (loop - ref[:N_LOOP]).abs().max().item() <= 1e-4
        for name in ("prealloc", "concat"):
            got = torch.stack([s.logits for s in r[name]])
            assert got.shape == (N_NEW, model.config.vocab_size)
            err = (got - ref).abs().max().item()
            assert err <= 1e-4, f"{name}: max |logit difference| {err:.2e} > 1e-4"


def test_cache_bytes_equal_the_calculator(real_model):
    from kvlab.cache import ContiguousKVCache
    from kvlab.costs.memory import MODELS, kv_bytes_per_token, kv_cache_bytes

    model, tok = real_model
    cache = ContiguousKVCache.for_model(model, batch=2, max_len=40)
    with torch.inference_mode():
        model(torch.tensor([tok.encode("Hello there")] * 2), cache=cache)
    held = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert held == cache.nbytes == kv_cache_bytes(model.config, 40, batch=2, dtype_bytes=4)
    per_token = kv_bytes_per_token(model.config, 4)
    assert per_token == kv_bytes_per_token(MODELS["smollm2-135m"], 4) == 30 * 2 * 3 * 64 * 4


def test_generate_matches_iter_generate_and_batch(runs, real_model):
    model, _ = real_model
    ids, r, _ = runs[0]
    want = [s.token for s in r["prealloc"]][:12]
    assert kvlab.generate(model, ids, 12) == want
    # rows of different lengths, right-padded, per-row cache lengths: each row as if alone
    prompts = [ids, runs[1][0], runs[2][0][:3]]
    alone = [kvlab.generate(model, p, 12) for p in prompts]
    assert alone[0] == want and alone[1] == [s.token for s in runs[1][1]["prealloc"]][:12]
    assert generate_batch(model, prompts, 12) == alone
    assert generate_batch(model, prompts, 12, use_cache=False) == alone


def test_eos_stops_and_is_included(tiny_model):
    ids = [1, 2, 3]
    full = kvlab.generate(tiny_model, ids, 10)
    eos = full[4]
    first = full.index(eos)
    assert kvlab.generate(tiny_model, ids, 10, eos_token_id=eos) == full[:first + 1]
    batch = generate_batch(tiny_model, [ids, [5, 6]], 10, eos_token_id=eos)
    assert batch[0] == full[:first + 1]


def test_seeded_sampling_is_deterministic(tiny_model):
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    a = kvlab.generate(tiny_model, [1, 2, 3], 16, seed=7, **kw)
    assert a == kvlab.generate(tiny_model, [1, 2, 3], 16, seed=7, **kw)
    assert a == kvlab.generate(tiny_model, [1, 2, 3], 16, seed=7, use_cache=False, **kw)
    others = {tuple(kvlab.generate(tiny_model, [1, 2, 3], 16, seed=s, **kw)) for s in range(5)}
    assert len(others) > 1  # different seeds, different samples


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {int(sample_next(logits, 1.0, generator=g, **kw)) for _ in range(300)}  # noqa: E731
    assert draws(top_k=1) == {0}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.5) == {0}            # 0.5 alone reaches 0.5
    assert draws(top_p=0.8) == {0, 1}         # 0.5 + 0.3 reaches 0.8
    assert draws(top_p=0.81) == {0, 1, 2}
    assert draws() == {0, 1, 2, 3}
    assert int(sample_next(logits)) == 0      # temperature 0: argmax


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    cold = [int(sample_next(logits, 0.05, generator=g)) for _ in range(200)]
    hot = [int(sample_next(logits, 100.0, generator=g)) for _ in range(600)]
    assert set(cold) == {0}
    assert min(hot.count(i) for i in range(3)) > 150  # close to uniform


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=1.0, top_k=0), "top_k"),
    (dict(temperature=1.0, top_k=2.5), "top_k"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(top_k=5), "temperature > 0"),
    (dict(cache="paged"), "cache must be one of"),
])
def test_bad_arguments_raise(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kvlab.generate(tiny_model, [1, 2], 4, **kwargs)


def test_bad_lengths_raise(tiny_model):
    limit = tiny_model.config.max_position_embeddings
    with pytest.raises(ValueError, match="at least one token"):
        kvlab.generate(tiny_model, [], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        kvlab.generate(tiny_model, [1], -1)
    with pytest.raises(ValueError, match=f"max_position_embeddings={limit}"):
        kvlab.generate(tiny_model, [1, 2], limit)
    with pytest.raises(ValueError, match="equal length"):
        generate_batch(tiny_model, [[1, 2], [3]], 2, cache="concat")
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_batch(tiny_model, [], 2)
    assert kvlab.generate(tiny_model, [1], 0) == []
