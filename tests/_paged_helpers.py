"""Random paged caches and the float64 reference for the kernel tests (tests/test_kernels_*.py)."""
from __future__ import annotations

import math
import os

import torch

from kvlab.cache.base import causal_attention

# On a GPU run (pytest --gpu, TRITON_INTERPRET unset) the kernels run on CUDA; otherwise on the CPU
# in Triton's interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
                      else "cpu")


def random_paged(lens, Hkv, D, BS, dtype=torch.float32, spare_blocks=3, seed=0):
    """K/V caches [NB, BS, Hkv, D] filled with random numbers, a block table that scatters each
    sequence over shuffled blocks (-1 padded), and context lengths."""
    g = torch.Generator().manual_seed(seed)
    need = [(n + BS - 1) // BS for n in lens]
    NB = sum(need) + spare_blocks
    M = max(max(need), 1) + 1                                   # one extra -1 column
    k = torch.randn(NB, BS, Hkv, D, generator=g).to(dtype)
    v = torch.randn(NB, BS, Hkv, D, generator=g).to(dtype)
    perm = torch.randperm(NB, generator=g)
    bt = torch.full((len(lens), M), -1, dtype=torch.int32)
    used = 0
    for s, nb in enumerate(need):
        bt[s, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    ctx = torch.tensor(lens, dtype=torch.int32)
    return k.to(DEVICE), v.to(DEVICE), bt.to(DEVICE), ctx.to(DEVICE)


def gather(cache, bt_row, n):
    BS = cache.shape[1]
    blocks = bt_row[: (n + BS - 1) // BS].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:n]     # [n, Hkv, D]


def reference_decode(q, k, v, bt, ctx):
    """float64 decode attention: each sequence's one query over its gathered context."""
    out = []
    for s, n in enumerate(ctx.tolist()):
        ks = gather(k, bt[s], n).double().unsqueeze(0)
        vs = gather(v, bt[s], n).double().unsqueeze(0)
        out.append(causal_attention(q[s:s + 1].double().unsqueeze(0), ks, vs, q_offset=n - 1)[0, 0])
    return torch.stack(out)


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "output has NaN: some element was not written"
    return ((out.double() - ref).norm() / ref.norm()).item()


def scale_for(D):
    return 1.0 / math.sqrt(D)        # causal_attention's scale
