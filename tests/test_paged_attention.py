"""Paged attention (PyTorch reference) and PagedKVCache against causal_attention, in float64.

Random block pools, block tables that scatter a sequence over non-adjacent blocks, mixed context
lengths, GQA, and prefills whose queries are only the last q_len < context_len positions.
Tolerance: 1e-10 absolute in float64 (the two paths sum in different orders).
"""
import math

import pytest
import torch

from kvlab.attention import backend_module, paged_torch
from kvlab.cache.base import causal_attention
from kvlab.cache.paged import AttentionMetadata, PagedKVCache

TOL = 1e-10


def _layout(ctx_lens, block_size, num_blocks, gen):
    """Random disjoint block tables (padded with -1) for the given context lengths."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, M = [], max(-(-L // block_size) for L in ctx_lens)
    for L in ctx_lens:
        n = -(-L // block_size)
        tables.append(perm[:n] + [-1] * (M - n))
        perm = perm[n:]
    return torch.tensor(tables, dtype=torch.int32)


def _contiguous(cache, table, L, block_size):
    blocks = [b for b in table.tolist() if b >= 0]
    return cache[blocks].reshape(-1, *cache.shape[2:])[:L]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("ctx", [[1, 5, 17, 33], [19]])
def test_decode_matches_reference(block_size, Hq, Hkv, ctx):
    gen = torch.Generator().manual_seed(block_size * 31 + Hq + Hkv)
    D = 8
    NB = sum(-(-L // block_size) for L in ctx) + 3
    kc = torch.randn(NB, block_size, Hkv, D, dtype=torch.float64, generator=gen)
    vc = torch.randn(NB, block_size, Hkv, D, dtype=torch.float64, generator=gen)
    tables = _layout(ctx, block_size, NB, gen)
    q = torch.randn(len(ctx), Hq, D, dtype=torch.float64, generator=gen)
    out = paged_torch.paged_decode_attention(q, kc, vc, tables, torch.tensor(ctx, dtype=torch.int32),
                                             1 / math.sqrt(D))
    for s, L in enumerate(ctx):
        k, v = _contiguous(kc, tables[s], L, block_size), _contiguous(vc, tables[s], L, block_size)
        ref = causal_attention(q[s].view(1, 1, Hq, D), k[None], v[None], L - 1)[0, 0]
        torch.testing.assert_close(out[s], ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_prefill_matches_reference_with_cached_prefix(block_size):
    """Each sequence has ctx tokens in the cache; its q_len new queries are the last q_len."""
    gen = torch.Generator().manual_seed(block_size)
    Hq, Hkv, D = 4, 2, 8
    ctx, qlen = [7, 1, 20, 16], [7, 1, 3, 16]      # full prefill, 1 token, cached prefix, exact blocks
    NB = sum(-(-L // block_size) for L in ctx) + 2
    kc = torch.randn(NB, block_size, Hkv, D, dtype=torch.float64, generator=gen)
    vc = torch.randn(NB, block_size, Hkv, D, dtype=torch.float64, generator=gen)
    tables = _layout(ctx, block_size, NB, gen)
    qsl = torch.tensor([0] + torch.tensor(qlen).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(qlen), Hq, D, dtype=torch.float64, generator=gen)
    out = paged_torch.paged_prefill_attention(q, kc, vc, tables, qsl,
                                              torch.tensor(ctx, dtype=torch.int32), 1 / math.sqrt(D))
    for s, L in enumerate(ctx):
        a, b = int(qsl[s]), int(qsl[s + 1])
        k, v = _contiguous(kc, tables[s], L, block_size), _contiguous(vc, tables[s], L, block_size)
        ref = causal_attention(q[a:b][None], k[None], v[None], L - (b - a))[0]
        torch.testing.assert_close(out[a:b], ref, atol=TOL, rtol=0)


def test_reshape_and_cache_writes_exactly_the_slots():
    NB, BS, H, D = 6, 4, 2, 3
    kc, vc = torch.zeros(NB, BS, H, D), torch.zeros(NB, BS, H, D)
    k, v = torch.randn(3, H, D), torch.randn(3, H, D)
    slots = torch.tensor([5, 0, -1, 23])[:3]                  # block 1 offset 1, block 0 offset 0, pad
    paged_torch.reshape_and_cache(k, v, kc, vc, slots)
    assert torch.equal(kc[1, 1], k[0]) and torch.equal(vc[0, 0], v[1])
    assert int((kc != 0).any(-1).any(-1).sum()) == 2          # nothing else written, padding skipped


def test_paged_cache_in_the_model_matches_no_cache(tiny_model):
    """Two sequences packed in one forward (B = 1), blocks interleaved, then one decode step each."""
    cfg, bs = tiny_model.config, 4
    cache = PagedKVCache(cfg.num_layers, 8, bs, cfg.num_kv_heads, cfg.head_dim)
    a, b = [3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8, 1, 8, 2]
    ta, tb = [5, 1], [0, 6, 3]
    slots = [ta[p // bs] * bs + p % bs for p in range(len(a))] + [tb[p // bs] * bs + p % bs for p in range(len(b))]
    meta = AttentionMetadata(torch.tensor(slots), torch.tensor([0, 6, 15], dtype=torch.int32),
                             torch.tensor([6, 9], dtype=torch.int32),
                             torch.tensor([ta + [-1], tb], dtype=torch.int32), False)
    cache.set_metadata(meta)
    pos = torch.tensor([list(range(6)) + list(range(9))])
    with torch.no_grad():
        out = tiny_model(torch.tensor([a + b]), positions=pos, cache=cache, logit_indices=torch.tensor([5, 14]))
        ref = torch.cat([tiny_model(torch.tensor([a]))[0, -1:], tiny_model(torch.tensor([b]))[0, -1:]])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # one decode step: token 6 of a (slot in block 1), token 9 of b (block 3, offset 1)
    meta = AttentionMetadata(torch.tensor([1 * bs + 2, 3 * bs + 1]), torch.tensor([0, 1, 2], dtype=torch.int32),
                             torch.tensor([7, 10], dtype=torch.int32),
                             torch.tensor([ta + [-1], tb], dtype=torch.int32), True)
    cache.set_metadata(meta)
    with torch.no_grad():
        out = tiny_model(torch.tensor([[7, 4]]), positions=torch.tensor([[6, 9]]), cache=cache)[0]
        ref = torch.cat([tiny_model(torch.tensor([a + [7]]))[0, -1:], tiny_model(torch.tensor([b + [4]]))[0, -1:]])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_paged_cache_rejects_bad_configuration():
    with pytest.raises(ValueError, match="num_blocks"):
        PagedKVCache(2, 0, 16, 2, 8)
    with pytest.raises(ValueError, match="attention_backend"):
        PagedKVCache(2, 4, 16, 2, 8, attention_backend="cuda")
    with pytest.raises(RuntimeError, match="set_metadata"):
        PagedKVCache(1, 4, 16, 2, 8).attend(0, torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8),
                                             torch.zeros(1, 1, 2, 8))
    assert backend_module("torch") is paged_torch
    assert PagedKVCache.bytes_per_block(30, 16, 3, 64, torch.float32) == 2 * 30 * 16 * 3 * 64 * 4
