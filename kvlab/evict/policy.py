"""Which KV entries a sequence keeps once it holds more than its budget.

A policy sees the entries a layer holds, in the order of their original positions, and returns the
indices of the ones to keep (ascending, so the kept store stays in position order). Four rules:

- ``window``: the last ``budget`` entries (a sliding window, as Mistral-style sliding-window layers
  and Longformer's local attention use).
- ``streaming``: the first ``num_sinks`` entries of the sequence plus the most recent ones
  (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks"): the first tokens
  collect attention whatever their content, and a window that drops them loses that mass.
- ``h2o``: the ``recent`` most recent entries plus the ``budget - recent`` older entries with the
  largest attention accumulated so far, per KV head (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle
  for Efficient Generative Inference of Large Language Models").
- ``snapkv``: once, at the end of the prompt, the attention of the last ``recent`` prompt queries
  (the observation window) is summed per key, smoothed by max-pooling over neighbouring positions,
  and the top ``budget - recent`` older prompt entries are kept per KV head with the window (Li et
  al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"). Decoding then keeps
  those selected prompt entries pinned and slides a window of ``recent`` entries over the rest.

The twin cache (`kvlab.evict.twin`) calls `select_keep` after each forward; the selection rules here
are plain functions of the scores, so they are tested against brute-force loops.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

POLICIES = ("window", "streaming", "h2o", "snapkv")


@dataclass(frozen=True)
class EvictionConfig:
    """A per-sequence KV token budget and the rule that keeps it.

    budget: entries a sequence keeps per layer (and per KV head) after each forward pass.
    num_sinks: first tokens ``streaming`` always keeps.
    recent: the recent window of ``h2o`` (default budget // 2) and the observation/decode window of
        ``snapkv`` (default min(32, budget // 2)).
    pool: ``snapkv``'s max-pooling width over positions (odd).
    keep_top: the scored rules' selection, a function with `keep_top_and_recent`'s signature (None:
        that function; chapter 09's exercise plugs a student's in).
    block_size: a budget must hold the sinks plus one block of recent tokens; the engine's block
        size, and the twin's cut is then block-lazy as the engine's (1: cut after every pass).
    """
    policy: str
    budget: int
    num_sinks: int = 4
    recent: int | None = None
    pool: int = 7
    block_size: int = 1
    keep_top: Callable | None = None   # h2o's and snapkv's choice, keep_top_and_recent's signature

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"kv_eviction must be one of {POLICIES}, got {self.policy!r}")
        if not isinstance(self.budget, int) or self.budget <= 0:
            raise ValueError(f"kv_budget_tokens must be a positive int, got {self.budget!r}")
        if self.num_sinks < 0:
            raise ValueError(f"num_sink_tokens must be >= 0, got {self.num_sinks}")
        sinks = self.num_sinks if self.policy == "streaming" else 0
        if self.budget < sinks + self.block_size:
            raise ValueError(f"kv_budget_tokens={self.budget} is smaller than num_sink_tokens ({sinks}) plus "
                             f"one block ({self.block_size}): the budget must be >= {sinks + self.block_size}")
        if self.policy in ("h2o", "snapkv"):
            r = self.window
            if not 1 <= r < self.budget:
                raise ValueError(f"{self.policy}: recent must be in [1, kv_budget_tokens={self.budget}), got {r}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be a positive odd width, got {self.pool}")

    @property
    def window(self) -> int:
        """The recent entries always kept: budget - sinks for streaming, budget for window."""
        if self.policy == "window":
            return self.budget
        if self.policy == "streaming":
            return self.budget - self.num_sinks
        if self.recent is not None:
            return self.recent
        return self.budget // 2 if self.policy == "h2o" else min(32, self.budget // 2)


def keep_pinned_and_recent(n: int, pinned: int, recent: int, shape, device=None) -> torch.Tensor:
    """Indices [*shape, k]: entries 0..pinned-1 and the last `recent` of n (all of them if they fit)."""
    if pinned + recent >= n:
        idx = torch.arange(n, device=device)
    else:
        idx = torch.cat([torch.arange(pinned, device=device), torch.arange(n - recent, n, device=device)])
    return idx.expand(*shape, idx.numel())


def keep_top_and_recent(scores: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """scores [..., n] of the entries -> ascending indices [..., budget]: the last `recent` entries
    and the `budget - recent` highest-scoring older ones (ties: the earlier entry)."""
    n = scores.shape[-1]
    if n <= budget:
        return torch.arange(n, device=scores.device).expand(*scores.shape[:-1], n)
    older = scores[..., :n - recent]
    # stable order: sort by score descending, earlier index first among equals
    top = torch.sort(older, dim=-1, descending=True, stable=True).indices[..., :budget - recent]
    tail = torch.arange(n - recent, n, device=scores.device).expand(*scores.shape[:-1], recent)
    return torch.sort(torch.cat([top, tail], dim=-1), dim=-1).values


def pool_scores(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Max over a centred window of `width` neighbouring positions, [..., n] -> [..., n] (SnapKV's
    clustering step: a kept entry keeps its neighbours' importance too)."""
    if width == 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    pooled = F.max_pool1d(flat, kernel_size=width, stride=1, padding=width // 2)
    return pooled.reshape(shape)


def select_keep(cfg: EvictionConfig, n: int, pinned: int = 0, scores: torch.Tensor | None = None,
                shape=(1, 1)) -> torch.Tensor:
    """Indices [*shape, k] (ascending) of the entries to keep out of n, k = min(n, budget).

    pinned: leading entries kept whatever happens (streaming's sinks, snapkv's selected prompt).
    scores [*shape, n]: accumulated attention (h2o) or the pooled observation scores (snapkv's
    snap; the caller passes pinned=0 then and pins the result).
    """
    device = scores.device if scores is not None else None
    if n <= cfg.budget:
        return torch.arange(n, device=device).expand(*shape, n)
    keep_top = cfg.keep_top or keep_top_and_recent
    if cfg.policy == "h2o":
        if scores is None:
            raise ValueError("h2o needs the accumulated attention scores")
        return keep_top(scores, cfg.budget, cfg.window)
    if cfg.policy == "snapkv" and scores is not None:
        return keep_top(scores, cfg.budget, cfg.window)
    if cfg.policy == "streaming":
        pinned = min(cfg.num_sinks, n)
    return keep_pinned_and_recent(n, pinned, cfg.budget - pinned, shape, device)
