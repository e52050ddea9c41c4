"""The one seam between the model and every KV cache.

Each attention layer projects its input to q, k, v for the *new* tokens, rotates q and k, and then
hands all three to the cache:

    out = cache.attend(layer, q, k, v)      # q [B, T, Hq, D], k and v [B, T, Hkv, D]

The cache stores k and v wherever it keeps them (a contiguous tensor, paged blocks, quantized
blocks), and returns causal attention of the new queries over everything the sequence has seen,
[B, T, Hq, D]. After the last layer the model calls `cache.advance(T)` once, so the cache can move
its length pointer. The model never sees the storage layout; see docs/architecture.md.

Sliding-window layers (docs/architecture.md, "Sliding-window layers"): a cache built with
`sliding_windows` (one entry per layer, None = full attention) lets a query at position p of a
windowed layer see only the keys at positions p - W + 1 .. p. The model checks that its cache
applies the windows its config declares (`check_cache_windows` in kvlab/model/llama.py).
"""
from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@runtime_checkable
class KVCache(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v of the new tokens for `layer`; return attention of q over the whole context."""
        ...

    def advance(self, num_tokens: int) -> None:
        """Called once per forward pass, after the last layer, with the number of new tokens."""
        ...


def check_sliding_windows(sliding_windows, num_layers: int | None,
                          owner: str) -> tuple[int | None, ...] | None:
    """`sliding_windows` as a tuple (or None): one entry per layer, each None or an int >= 1."""
    if sliding_windows is None:
        return None
    windows = tuple(sliding_windows)
    if num_layers is not None and len(windows) != num_layers:
        raise ValueError(f"{owner}: sliding_windows must have one entry per layer (num_layers="
                         f"{num_layers}), got {len(windows)}")
    for w in windows:
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"{owner}: each sliding_windows entry must be None or an integer >= 1, "
                             f"got {w!r}")
    return windows


def layer_window(sliding_windows, layer: int) -> int | None:
    """The window of `layer` in a per-layer list, None for a full-attention layer or no list."""
    return None if sliding_windows is None else sliding_windows[layer]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     q_offset: int | torch.Tensor = 0, sliding_window: int | None = None) -> torch.Tensor:
    """Reference grouped-query attention with a causal mask, in the model's [B, T, H, D] layout.

    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] with Hq a multiple of Hkv. Query i sits at absolute
    position q_offset + i and sees keys 0 .. q_offset + i. `q_offset` is an int or a [B] tensor
    (then each row of the batch has its own offset, and keys past a row's context are masked).
    `sliding_window` W: query at position p sees keys p - W + 1 .. p only (None: all of 0 .. p).
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    if sliding_window is None and isinstance(q_offset, int) and q_offset == 0 and Tq == Tk:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=Hq != Hkv)
        return out.transpose(1, 2)
    off = torch.as_tensor(q_offset, device=q.device).reshape(-1, 1, 1)  # [B or 1, 1, 1]
    q_pos = off + torch.arange(Tq, device=q.device).view(1, Tq, 1)
    k_pos = torch.arange(Tk, device=q.device).view(1, 1, Tk)
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (k_pos > q_pos - sliding_window)
    mask = mask.unsqueeze(1)  # [B or 1, 1, Tq, Tk]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=Hq != Hkv,
                                         scale=1.0 / math.sqrt(D))
    return out.transpose(1, 2)


class NoCache:
    """Recompute everything: attention over exactly the tokens passed in, nothing is kept.
    `sliding_windows`: per layer, as every cache takes it (the model passes its config's)."""

    def __init__(self, sliding_windows=None):
        self.sliding_windows = check_sliding_windows(sliding_windows, None, "NoCache")

    def attend(self, layer, q, k, v):
        return causal_attention(q, k, v, sliding_window=layer_window(self.sliding_windows, layer))

    def advance(self, num_tokens):
        pass
