"""Attention from scratch: the small pieces chapter 01 builds, each checked against PyTorch's SDPA.

Shapes follow PyTorch's `scaled_dot_product_attention`: q [B, H, Tq, D], k and v [B, Hkv, Tk, D].
(The model itself works in [B, T, H, D]; see kvlab.cache.base.causal_attention.)

    attention(q, k, v) = softmax(q k^T / sqrt(D) + mask) v          (Vaswani et al., 2017)

Grouped-query attention (Ainslie et al., 2023, "GQA: Training Generalized Multi-Query Transformer
Models from Multi-Head Checkpoints") lets G = H / Hkv query heads share one key/value head;
multi-query attention (Shazeer, 2019, "Fast Transformer Decoding: One Write-Head is All You
Need") is the extreme Hkv = 1. Sharing heads divides the KV cache by G; the arithmetic is the same
as multi-head attention on keys and values repeated G times (`repeat_kv`).

These are written for clarity, not speed: they materialise the whole [Tq, Tk] score matrix.
"""
from __future__ import annotations

import math

import torch


def stable_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax(x) = exp(x - max) / sum(exp(x - max)).

    Subtracting the row maximum changes nothing mathematically (it cancels between numerator and
    denominator) but keeps every exponent <= 0, so exp never overflows. Rows that are entirely
    -inf (a query that may see nothing) return zeros instead of NaN.
    """
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    s = e.sum(dim=dim, keepdim=True)
    return e / torch.where(s == 0, torch.ones_like(s), s)


def naive_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x) / sum(exp(x)): correct on paper, overflows to inf/inf = NaN once x > ~88 in float32."""
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


def causal_mask(tq: int, tk: int | None = None, device=None) -> torch.Tensor:
    """Boolean [tq, tk] mask, True where query i may attend to key j.

    The queries are the *last* tq of tk positions (tk >= tq: earlier tokens are context, e.g. in a
    KV cache), so query i sits at position tk - tq + i and sees keys j <= tk - tq + i.
    """
    tk = tq if tk is None else tk
    if tk < tq:
        raise ValueError(f"causal_mask: tk ({tk}) must be >= tq ({tq}); queries are the last tq positions")
    q_pos = torch.arange(tq, device=device)[:, None] + (tk - tq)
    return torch.arange(tk, device=device)[None, :] <= q_pos


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None, causal: bool = False,
                                 return_weights: bool = False):
    """softmax(q k^T / sqrt(D), masked) v for q [..., Tq, D], k [..., Tk, D], v [..., Tk, Dv].

    mask: boolean, broadcastable to [..., Tq, Tk], True = may attend. causal: add `causal_mask`.
    return_weights: also return the attention probabilities [..., Tq, Tk].
    """
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dim, got {q.shape[-1]} and {k.shape[-1]}")
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [..., Tq, Tk]
    if causal:
        c = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
        mask = c if mask is None else mask & c
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = stable_softmax(scores, dim=-1)
    out = weights @ v
    return (out, weights) if return_weights else out


def repeat_kv(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * group_size, T, D]: KV head j serves query heads j*G .. j*G+G-1.

    This is the convention of Hugging Face Llama and of SDPA's `enable_gqa`: consecutive query heads
    share a KV head (repeat_interleave, not tile).
    """
    if group_size < 1:
        raise ValueError(f"repeat_kv: group_size must be >= 1, got {group_size}")
    return x if group_size == 1 else x.repeat_interleave(group_size, dim=1)


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            causal: bool = True) -> torch.Tensor:
    """Attention with H query heads over Hkv key/value heads: q [B, H, Tq, D], k, v [B, Hkv, Tk, D].

    H == Hkv is multi-head attention, Hkv == 1 multi-query attention, anything between is GQA.
    """
    h, hkv = q.shape[1], k.shape[1]
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    g = h // hkv
    return scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), causal=causal)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H*D] -> [B, H, T, D]."""
    B, T, C = x.shape
    if C % num_heads:
        raise ValueError(f"split_heads: width {C} is not a multiple of num_heads {num_heads}")
    return x.view(B, T, num_heads, C // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D]."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_value: int = 2) -> int:
    """Bytes of K and V one token occupies in the cache: 2 (K and V) * layers * Hkv * D * bytes."""
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_value
