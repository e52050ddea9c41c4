"""The contiguous caches against the reference: `causal_attention` over the full sequence."""
import pytest
import torch

from kvlab.cache import ConcatKVCache, ContiguousKVCache, KVCache, NoCache, causal_attention


def _qkv(B, T, Hq=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64),
            torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64),
            torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64))


def _make(kind, B, max_len=32):
    if kind == "prealloc":
        return ContiguousKVCache(num_layers=2, batch=B, num_kv_heads=2, head_dim=16, max_len=max_len,
                                 dtype=torch.float64)
    return ConcatKVCache(num_layers=2)


@pytest.mark.parametrize("kind", ["prealloc", "concat"])
@pytest.mark.parametrize("chunks", [[12], [5, 1, 1, 1], [3, 4, 5], [1] * 7])
def test_chunked_attention_matches_reference(kind, chunks):
    B, T = 2, sum(chunks)
    q, k, v = _qkv(B, T)
    ref = causal_attention(q, k, v)
    cache = _make(kind, B)
    assert isinstance(cache, KVCache)
    outs, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        assert cache.position_offset == start
        outs.append(cache.attend(0, q[:, sl], k[:, sl], v[:, sl]))
        cache.attend(1, q[:, sl], k[:, sl], v[:, sl])  # a second layer keeps its own storage
        cache.advance(n)
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, atol=1e-12, rtol=0)


def test_per_row_lengths_match_each_row_alone():
    # row 0 holds 6 tokens; row 1 holds 3 real tokens then 3 pad tokens (junk), rewound to 3
    q, k, v = _qkv(2, 8, seed=1)
    junk = [t[:, :6].clone() for t in (q, k, v)]
    for t in junk:
        t[1, 3:] = 100.0
    cache = _make("prealloc", 2)
    cache.attend(0, *junk)
    cache.advance(6)
    cache.set_lengths([6, 3])
    assert torch.equal(cache.position_offset, torch.tensor([[6], [3]]))
    for step in range(2):
        idx = torch.tensor([6 + step, 3 + step])  # the next token of each row
        qs, ks, vs = (t[torch.arange(2), idx].unsqueeze(1) for t in (q, k, v))
        out = cache.attend(0, qs, ks, vs)
        cache.advance(1)
        for b in range(2):
            n = int(idx[b]) + 1
            ref = causal_attention(qs[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], q_offset=n - 1)
            torch.testing.assert_close(out[b:b + 1], ref, atol=1e-12, rtol=0)
    assert cache.lengths.tolist() == [8, 5]


def test_model_forward_with_cache_matches_no_cache(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_model(ids)
        for cache in (ContiguousKVCache.for_model(tiny_model, batch=2, max_len=10),
                      ConcatKVCache.for_model(tiny_model)):
            first = tiny_model(ids[:, :7], cache=cache)
            rest = [tiny_model(ids[:, t:t + 1], cache=cache) for t in range(7, 10)]
            torch.testing.assert_close(torch.cat([first, *rest], dim=1), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tiny_model(ids, cache=NoCache()), ref, atol=0, rtol=0)


def test_prealloc_bytes_fixed_concat_bytes_grow():
    pre, cat = _make("prealloc", 1, max_len=20), _make("concat", 1)
    full = 2 * 2 * 1 * 2 * 20 * 16 * 8  # layers * (K,V) * batch * heads * max_len * dim * float64
    assert pre.nbytes == full and cat.nbytes == 0
    q, k, v = _qkv(1, 5)
    for layer in range(2):
        pre.attend(layer, q, k, v)
        cat.attend(layer, q, k, v)
    assert pre.nbytes == full
    assert cat.nbytes == 2 * 2 * 1 * 2 * 5 * 16 * 8


def test_errors_name_the_limit():
    cache = _make("prealloc", 1, max_len=4)
    q, k, v = _qkv(1, 5)
    with pytest.raises(ValueError, match="max_len=4"):
        cache.attend(0, q, k, v)
    with pytest.raises(ValueError, match="layer must be in"):
        cache.attend(2, q[:, :1], k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="batch"):
        cache.attend(0, *_qkv(2, 1))
    with pytest.raises(ValueError, match="max_len"):
        cache.set_lengths([5])
    with pytest.raises(ValueError, match="max_len must be positive"):
        ContiguousKVCache(1, 1, 1, 8, 0)
    with pytest.raises(ValueError, match="num_layers"):
        ConcatKVCache(0)
