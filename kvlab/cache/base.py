"""The one seam between the model and every KV cache.

Each attention layer projects its input to q, k, v for the *new* tokens, rotates q and k, and then
hands all three to the cache:

    out = cache.attend(layer, q, k, v)      # q [B, T, Hq, D], k and v [B, T, Hkv, D]

The cache stores k and v wherever it keeps them (a contiguous tensor, paged blocks, quantized
blocks), and returns causal attention of the new queries over everything the sequence has seen,
[B, T, Hq, D]. After the last layer the model calls `cache.advance(T)` once, so the cache can move
its length pointer. The model never sees the storage layout; see docs/architecture.md.
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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     q_offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Reference grouped-query attention with a causal mask, in the model's [B, T, H, D] layout.

    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] with Hq a multiple of Hkv. Query i sits at absolute
    position q_offset + i and sees keys 0 .. q_offset + i. `q_offset` is an int or a [B] tensor
    (then each row of the batch has its own offset, and keys past a row's context are masked).
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    if isinstance(q_offset, int) and q_offset == 0 and Tq == Tk:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=Hq != Hkv)
        return out.transpose(1, 2)
    off = torch.as_tensor(q_offset, device=q.device).reshape(-1, 1, 1)  # [B or 1, 1, 1]
    q_pos = off + torch.arange(Tq, device=q.device).view(1, Tq, 1)
    k_pos = torch.arange(Tk, device=q.device).view(1, 1, Tk)
    mask = (k_pos <= q_pos).unsqueeze(1)  # [B or 1, 1, Tq, Tk]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=Hq != Hkv,
                                         scale=1.0 / math.sqrt(D))
    return out.transpose(1, 2)


class NoCache:
    """Recompute everything: attention over exactly the tokens passed in, nothing is kept."""

    def attend(self, layer, q, k, v):
        return causal_attention(q, k, v)

    def advance(self, num_tokens):
        pass
