"""kvlab.attention.paged_triton: the engine's three entry points on the Triton kernels, against
float64 causal attention over the gathered cache (prefill with cached prefixes, mixed batches)."""
import pytest
import torch

pytest.importorskip("triton", reason="Triton is Linux-only; the kernels cannot run here")
from helpers import DEVICE, gather, random_paged, rel_err, scale_for

from kvlab.attention import paged_triton
from kvlab.cache.base import causal_attention


def test_prefill_over_cached_prefix():
    BS, Hkv, group, D = 16, 2, 3, 64
    lens = [40, 1, 17, 16]            # tokens in the cache after this step
    q_lens = [8, 1, 17, 3]            # new tokens: a prefix-cached chunk, a decode, a full prompt
    k, v, bt, ctx = random_paged(lens, Hkv, D, BS, seed=11)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    N = sum(q_lens)
    q = torch.randn(N, Hkv * group, D, device=DEVICE)
    out = paged_triton.paged_prefill_attention(q, k, v, bt, qsl, ctx, scale_for(D))
    assert not torch.isnan(out).any()
    ref = []
    for s, (n, ql) in enumerate(zip(lens, q_lens)):
        ks, vs = gather(k, bt[s], n).double()[None], gather(v, bt[s], n).double()[None]
        qs = q[qsl[s]:qsl[s + 1]].double()[None]
        ref.append(causal_attention(qs, ks, vs, q_offset=n - ql)[0])
    assert rel_err(out, torch.cat(ref)) < 1e-5


def test_write_then_decode_round_trip():
    """reshape_and_cache then paged_decode_attention equals attention over the written rows."""
    BS, Hkv, D, S = 16, 2, 64, 3
    lens = [5, 16, 33]
    _, _, bt, ctx = random_paged(lens, Hkv, D, BS, seed=2)
    NB = int(bt.max()) + 1
    kc = torch.full((NB, BS, Hkv, D), float("nan"), device=DEVICE)
    vc = kc.clone()
    ks = [torch.randn(n, Hkv, D, device=DEVICE) for n in lens]
    vs = [torch.randn(n, Hkv, D, device=DEVICE) for n in lens]
    slots = torch.cat([bt[s, torch.arange(n) // BS].long() * BS + torch.arange(n).to(DEVICE) % BS
                       for s, n in enumerate(lens)])
    paged_triton.reshape_and_cache(torch.cat(ks), torch.cat(vs), kc, vc, slots)
    q = torch.randn(S, 4, D, device=DEVICE)
    out = paged_triton.paged_decode_attention(q, kc, vc, bt, ctx, scale_for(D))
    ref = torch.stack([causal_attention(q[s][None, None].double(), ks[s][None].double(),
                                        vs[s][None].double(), q_offset=n - 1)[0, 0]
                       for s, n in enumerate(lens)])
    assert rel_err(out, ref) < 1e-5
