"""KV eviction: the selection rules against brute force, the twin cache against dense masked
attention, and the settings' errors."""
import itertools
import math

import pytest
import torch

from kvlab.cache.base import causal_attention
from kvlab.cache.contiguous import ContiguousKVCache
from kvlab.evict import EvictingKVCache, EvictionConfig, select_keep
from kvlab.evict.policy import keep_top_and_recent, pool_scores
from kvlab.model.config import LlamaConfig
from kvlab.model.layers import apply_rope, rope_cos_sin
from kvlab.model.llama import Llama

TINY = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=6,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=256)


def tiny_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    m = Llama(TINY).to(dtype).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m


# ---- settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(policy="lru", budget=64), "kv_eviction must be one of"),
    (dict(policy="window", budget=-8), "kv_budget_tokens must be a positive int"),
    (dict(policy="window", budget=0), "kv_budget_tokens must be a positive int"),
    (dict(policy="streaming", budget=19, num_sinks=4, block_size=16), r"must be >= 20"),
    (dict(policy="window", budget=8, block_size=16), r"must be >= 16"),
    (dict(policy="h2o", budget=16, recent=16), r"recent must be in \[1, kv_budget_tokens=16\)"),
    (dict(policy="snapkv", budget=16, recent=0), "recent must be in"),
    (dict(policy="snapkv", budget=64, pool=4), "pool must be a positive odd width"),
])
def test_bad_settings_name_the_limit(kw, match):
    with pytest.raises(ValueError, match=match):
        EvictionConfig(**kw)


def test_default_windows():
    assert EvictionConfig("window", 64).window == 64
    assert EvictionConfig("streaming", 64, num_sinks=4).window == 60
    assert EvictionConfig("h2o", 64).window == 32
    assert EvictionConfig("snapkv", 256).window == 32
    assert EvictionConfig("snapkv", 32).window == 16


# ---- selection rules ---------------------------------------------------------------------------
def brute_top_and_recent(scores, budget, recent):
    n = len(scores)
    if n <= budget:
        return list(range(n))
    older = sorted(range(n - recent), key=lambda i: (-scores[i], i))[:budget - recent]
    return sorted(older + list(range(n - recent, n)))


@pytest.mark.parametrize("seed", range(20))
def test_top_and_recent_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=g))
    budget = int(torch.randint(2, 20, (1,), generator=g))
    recent = int(torch.randint(1, budget, (1,), generator=g))
    # a few ties on purpose: scores drawn from a small set
    scores = torch.randint(0, 5, (3, 2, n), generator=g).double()
    got = keep_top_and_recent(scores, budget, recent)
    for b, h in itertools.product(range(3), range(2)):
        assert got[b, h].tolist() == brute_top_and_recent(scores[b, h].tolist(), budget, recent)


def test_window_and_streaming_selection():
    assert select_keep(EvictionConfig("window", 4), 10)[0, 0].tolist() == [6, 7, 8, 9]
    assert select_keep(EvictionConfig("streaming", 6, num_sinks=2), 10)[0, 0].tolist() == [0, 1, 6, 7, 8, 9]
    assert select_keep(EvictionConfig("streaming", 6, num_sinks=2), 5)[0, 0].tolist() == [0, 1, 2, 3, 4]
    # snapkv after its snap: the pinned prompt entries stay, a window slides over the rest
    cfg = EvictionConfig("snapkv", 6, recent=2)
    assert select_keep(cfg, 8, pinned=4)[0, 0].tolist() == [0, 1, 2, 3, 6, 7]


def test_pool_is_a_centred_max():
    s = torch.tensor([[0., 0., 5., 0., 0., 0., 1.]])
    assert pool_scores(s, 3).tolist() == [[0., 5., 5., 5., 0., 1., 1.]]
    assert pool_scores(s, 1).tolist() == s.tolist()


# ---- the twin cache ----------------------------------------------------------------------------
def banded_logits(model, ids, keep_rule):
    """Dense reference: each query i sees the keys j with j <= i and keep_rule(i, j)."""
    T = ids.shape[1]
    mask = torch.tensor([[j <= i and keep_rule(i, j) for j in range(T)] for i in range(T)])

    class Masked:
        def attend(self, layer, q, k, v):
            qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
            G = qh.shape[1] // kh.shape[1]
            kh, vh = kh.repeat_interleave(G, 1), vh.repeat_interleave(G, 1)
            s = (qh @ kh.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
            return (p @ vh).transpose(1, 2)

        def advance(self, n):
            pass

    return model(ids, cache=Masked())


def decode_one_by_one(model, ids, cache):
    out = []
    for t in range(ids.shape[1]):
        out.append(model(ids[:, t:t + 1], cache=cache))
        if cache.config is not None:
            assert cache.num_entries() <= cache.config.budget
    return torch.cat(out, 1)


def test_no_budget_equals_the_contiguous_cache():
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    ref = model(ids[:, :12], cache=(c := ContiguousKVCache.for_model(model, batch=3, max_len=32)))
    ref = torch.cat([ref, model(ids[:, 12:], cache=c)], 1)
    twin = EvictingKVCache.for_model(model, batch=3)
    got = torch.cat([model(ids[:, :12], cache=twin), model(ids[:, 12:], cache=twin)], 1)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("budget", [1, 3, 7])
def test_window_decoding_equals_a_band_mask(budget):
    """Token by token, a window of `budget` attends over budget + 1 keys (the stored window and the
    new token), exactly a band of width budget + 1."""
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    got = decode_one_by_one(model, ids, EvictingKVCache.for_model(model, 2, EvictionConfig("window", budget)))
    ref = banded_logits(model, ids, lambda i, j: i - j <= budget)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_streaming_with_original_positions_equals_sinks_plus_band():
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    cfg = EvictionConfig("streaming", 6, num_sinks=2)
    got = decode_one_by_one(model, ids, EvictingKVCache.for_model(model, 2, cfg, rope_positions="original"))
    ref = banded_logits(model, ids, lambda i, j: j < 2 or i - j <= 4)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_cache_positions_count_distances_inside_the_cache():
    """One attend call: with rope_positions='cache', scores equal those of unrotated keys rotated at
    their store index and the query at the store's end."""
    torch.manual_seed(4)
    D, theta = 8, 10000.0
    cache = EvictingKVCache(1, 1, 1, D, EvictionConfig("streaming", 4, num_sinks=1), theta)
    raw_k = torch.randn(1, 12, 1, D, dtype=torch.float64)
    v = torch.randn(1, 12, 1, D, dtype=torch.float64)
    rot = lambda x, pos: apply_rope(x, *rope_cos_sin(torch.tensor([pos]), D, theta, torch.float64))
    for t in range(11):                      # decode 11 tokens: the store keeps sink 0 + the last 3
        pos = torch.tensor([[t]])
        q = torch.zeros(1, 1, 1, D, dtype=torch.float64)
        cache.attend(0, rot(q, [t]), apply_rope(raw_k[:, t:t + 1], *rope_cos_sin(pos, D, theta, torch.float64)),
                     v[:, t:t + 1])
        cache.advance(1)
    assert cache.layers[0].pos[0, 0].tolist() == [0, 8, 9, 10]
    raw_q = torch.randn(1, 1, 1, D, dtype=torch.float64)
    t = 11
    out = cache.attend(0, rot(raw_q, [t]), rot(raw_k[:, t:t + 1], [t]), v[:, t:t + 1])
    kept = [0, 8, 9, 10, 11]
    k_ref = torch.cat([rot(raw_k[:, j:j + 1], [c]) for c, j in enumerate(kept)], 1)
    q_ref = rot(raw_q, [len(kept) - 1])
    ref = causal_attention(q_ref, k_ref, v[:, kept], q_offset=len(kept) - 1)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_h2o_keeps_the_most_attended_entries():
    """After a prompt, h2o keeps the recent window and, per KV head, the older entries with the most
    accumulated attention, as computed from a full-cache run's probabilities."""
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (1, 16), generator=torch.Generator().manual_seed(5))
    full = EvictingKVCache.for_model(model, 1)
    model(ids, cache=full)
    cfg = EvictionConfig("h2o", 6, recent=2)
    twin = EvictingKVCache.for_model(model, 1, cfg)
    model(ids, cache=twin)
    for layer in range(TINY.num_layers):
        acc = full.layers[layer].score
        want = keep_top_and_recent(acc, 6, 2)
        assert twin.layers[layer].pos.tolist() == want.tolist()
        torch.testing.assert_close(twin.layers[layer].score, acc.gather(2, want))


def test_snapkv_snaps_once_then_slides_a_window():
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (2, 30), generator=torch.Generator().manual_seed(6))
    cfg = EvictionConfig("snapkv", 8, recent=3, pool=3)
    twin = EvictingKVCache.for_model(model, 2, cfg)
    model(ids[:, :20], cache=twin)
    snapped = twin.layers[0].pos.clone()
    assert snapped.shape[-1] == 8 and (snapped[..., -3:] == torch.tensor([17, 18, 19])).all()
    for t in range(20, 30):
        model(ids[:, t:t + 1], cache=twin)
        pos = twin.layers[0].pos
        assert pos.shape[-1] == 8
        assert (pos[..., :5] == snapped[..., :5]).all()           # the selected prompt stays pinned
        assert pos[0, 0, -3:].tolist() == [t - 2, t - 1, t]       # a window over the rest


def test_a_prompt_within_the_budget_is_untouched():
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (1, 10), generator=torch.Generator().manual_seed(7))
    for policy in ("window", "streaming", "h2o", "snapkv"):
        twin = EvictingKVCache.for_model(model, 1, EvictionConfig(policy, 16, num_sinks=2))
        torch.testing.assert_close(model(ids, cache=twin), model(ids), rtol=1e-9, atol=1e-9)
        assert twin.num_entries() == 10


@pytest.mark.parametrize("cfg", [EvictionConfig("window", 5), EvictionConfig("streaming", 6, num_sinks=2),
                                 EvictionConfig("h2o", 6, recent=2), EvictionConfig("snapkv", 8, recent=3, pool=3)])
def test_fork_equals_running_the_policy_from_the_start(cfg):
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (2, 26), generator=torch.Generator().manual_seed(8))
    direct = EvictingKVCache.for_model(model, 2, cfg)
    full = EvictingKVCache.for_model(model, 2)
    a = model(ids[:, :18], cache=direct)
    b = model(ids[:, :18], cache=full)
    forked = full.fork(cfg)
    for t in range(18, 26):
        a = torch.cat([a, model(ids[:, t:t + 1], cache=direct)], 1)
        b = torch.cat([b, model(ids[:, t:t + 1], cache=forked)], 1)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for x, y in zip(direct.layers, forked.layers):
        assert x.pos.tolist() == y.pos.tolist()
    with pytest.raises(ValueError, match="exactly one forward"):
        forked.fork(cfg)
