"""A contiguous KV cache that drops entries by a policy: the accuracy twin of KV eviction.

It follows the cache protocol of `kvlab.cache.base` (attend / advance), so the real model runs on
it unchanged. Each layer keeps, per batch row and KV head, a store of keys, values, the original
positions and the attention each entry has received, in position order. A forward pass appends its
new tokens, attends over the store (explicit softmax, so the probabilities can be accumulated),
and then cuts the store back to the budget with `kvlab.evict.policy.select_keep`. The store never
holds more than budget + T entries (T the new tokens of the pass), and budget after it.

With ``config.block_size`` = b > 1 the cut is *block-lazy*, as the engine makes it
(kvlab/engine/kv_eviction.py): a store is cut back to the budget only once it holds budget + b
entries or more, so it holds between budget and budget + b - 1 entries after a pass (snapkv's
snap at the end of the prompt still happens whenever the prompt is over the budget). b = 1, the
default, cuts after every pass.

Positions. The model rotates keys at their original positions before they reach the cache. With
``rope_positions="original"`` (what H2O and SnapKV do: they compress post-rotation keys) they stay
so, and a query far past the window sees keys at their true distance. With ``"cache"`` (what
StreamingLLM does, and the default for ``streaming``), distances are counted inside the cache: the
entry at store index j is treated as sitting at position j and the newest query at the store's end,
so a model never sees a distance larger than its budget. Rotations compose, so instead of caching
unrotated keys the twin turns each stored key by (its cache position - its original position),
relative to the new queries' shift; the new tokens' keys need no turn.

Batch rows must advance together (teacher-forced windows of equal length, or one prompt each of
equal length), which is how the benchmark drives it.
"""
from __future__ import annotations

import math

import torch

from kvlab.evict.policy import EvictionConfig, pool_scores, select_keep
from kvlab.model.layers import apply_rope, rope_cos_sin

OBSERVED_QUERIES = 64   # the prompt's last queries whose attention `fork` can replay (snapkv's window)


class _LayerStore:
    """One layer's kept entries: k, v [B, Hkv, n, D], pos [B, Hkv, n], score [B, Hkv, n]."""

    def __init__(self):
        self.k = self.v = self.pos = self.score = None
        self.pinned = 0                      # leading entries no eviction may drop
        self.observed = None                 # the first forward's last queries' attention [B, Hkv, 1, Q, n]

    def copy(self) -> _LayerStore:
        new = _LayerStore()
        new.k, new.v, new.pos, new.score = self.k.clone(), self.v.clone(), self.pos.clone(), self.score.clone()
        new.pinned, new.observed = self.pinned, self.observed
        return new

    @property
    def n(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k, v, pos):
        zero = torch.zeros(pos.shape, dtype=torch.float64, device=pos.device)
        if self.k is None:
            self.k, self.v, self.pos, self.score = k, v, pos, zero
        else:
            self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
            self.pos, self.score = torch.cat([self.pos, pos], 2), torch.cat([self.score, zero], 2)

    def keep(self, idx: torch.Tensor):
        """idx [B, Hkv, k] ascending store indices."""
        d = self.k.shape[-1]
        full = idx.unsqueeze(-1).expand(*idx.shape, d)
        self.k, self.v = self.k.gather(2, full), self.v.gather(2, full)
        self.pos, self.score = self.pos.gather(2, idx), self.score.gather(2, idx)


class EvictingKVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 config: EvictionConfig | None = None, rope_theta: float = 10000.0,
                 rope_positions: str | None = None):
        if rope_positions is None:
            rope_positions = "cache" if config is not None and config.policy == "streaming" else "original"
        if rope_positions not in ("original", "cache"):
            raise ValueError(f"rope_positions must be 'original' or 'cache', got {rope_positions!r}")
        self.config, self.rope_positions, self.rope_theta = config, rope_positions, rope_theta
        self.batch, self.num_kv_heads, self.head_dim = batch, num_kv_heads, head_dim
        self.layers = [_LayerStore() for _ in range(num_layers)]
        self.length = 0                      # tokens the sequences have seen (original positions)
        self.num_forwards = 0
        self.max_entries = 0                 # the most entries one layer held after a forward

    @classmethod
    def for_model(cls, model, batch: int = 1, config: EvictionConfig | None = None, **kw) -> EvictingKVCache:
        c = model.config
        return cls(c.num_layers, batch, c.num_kv_heads, c.head_dim, config, c.rope_theta, **kw)

    @property
    def position_offset(self) -> int:
        return self.length

    def num_entries(self, layer: int = 0) -> int:
        return self.layers[layer].n

    def _turn_keys(self, store: _LayerStore, T: int) -> torch.Tensor:
        """Keys as the new queries see them (cache positions: turned by their position shift)."""
        if self.rope_positions == "original":
            return store.k
        n = store.n
        shift = (n - T) - self.length                         # the new queries' cache - original
        delta = torch.arange(n, device=store.pos.device) - store.pos - shift   # [B, Hkv, n]
        B, H = delta.shape[:2]
        cos, sin = rope_cos_sin(delta.reshape(B * H, n), self.head_dim, self.rope_theta, dtype=store.k.dtype)
        k = store.k.reshape(B * H, n, 1, self.head_dim)
        return apply_rope(k, cos, sin).reshape(store.k.shape)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        if B != self.batch or Hkv != self.num_kv_heads or D != self.head_dim:
            raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} do not fit a cache of batch {self.batch}, "
                             f"{self.num_kv_heads} KV heads, head_dim {self.head_dim}")
        store = self.layers[layer]
        pos = torch.arange(self.length, self.length + T, device=q.device).expand(B, Hkv, T)
        store.append(k.transpose(1, 2), v.transpose(1, 2), pos)
        keys = self._turn_keys(store, T)
        G = Hq // Hkv
        qh = q.view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4)              # [B, Hkv, G, T, D]
        scores = torch.einsum("bhgtd,bhnd->bhgtn", qh, keys) / math.sqrt(D)
        q_pos = torch.arange(self.length, self.length + T, device=q.device).view(1, 1, 1, T, 1)
        visible = store.pos.unsqueeze(2).unsqueeze(3) <= q_pos               # [B, Hkv, 1, T, n]
        work = torch.promote_types(scores.dtype, torch.float32)              # float32 at least
        probs = torch.softmax(scores.to(work).masked_fill(~visible, float("-inf")), dim=-1)
        out = torch.einsum("bhgtn,bhnd->bhgtd", probs.to(store.v.dtype), store.v)
        store.score += probs.sum(dim=(2, 3)).double()                         # H2O's accumulated attention
        if self.num_forwards == 0 and self.config is None:
            store.observed = probs[..., -OBSERVED_QUERIES:, :].sum(2, keepdim=True)
        self._evict(store, probs, T)
        self.max_entries = max(self.max_entries, store.n)
        return out.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D)

    def _evict(self, store: _LayerStore, probs: torch.Tensor, T: int) -> None:
        cfg = self.config
        if cfg is None or store.n <= cfg.budget:
            return
        shape = (self.batch, self.num_kv_heads)
        if cfg.policy == "snapkv" and self.length == 0:
            # the first forward is the prompt: snap once from its last `window` queries
            # (whenever the prompt is over the budget, as the engine does at the prompt's end)
            obs = probs[..., -min(cfg.window, T):, :].sum(dim=(2, 3)).double()   # [B, Hkv, n]
            store.keep(select_keep(cfg, store.n, scores=pool_scores(obs, cfg.pool), shape=shape))
            store.pinned = cfg.budget - cfg.window
            return
        if store.n < cfg.budget + cfg.block_size:
            return                           # block-lazy: cut once a whole block's worth is over
        score = store.score if cfg.policy == "h2o" else None
        store.keep(select_keep(cfg, store.n, pinned=store.pinned, scores=score, shape=shape))

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
        self.num_forwards += 1

    def fork(self, config: EvictionConfig, rope_positions: str | None = None) -> EvictingKVCache:
        """This full cache after its first forward (the prompt), as a cache under `config` would be
        after the same forward: one prompt prefill serves every policy of a comparison. Equal to
        running the prompt with `config` from the start (tests/test_evict.py), because a forward's
        outputs never depend on the eviction at the end of each layer's attend."""
        if self.config is not None or self.num_forwards != 1:
            raise ValueError("fork needs a cache with no budget after exactly one forward (the prompt)")
        if config.policy == "snapkv" and config.window > OBSERVED_QUERIES:
            raise ValueError(f"fork replays at most {OBSERVED_QUERIES} observed queries, snapkv's window is "
                             f"{config.window}")
        new = EvictingKVCache(len(self.layers), self.batch, self.num_kv_heads, self.head_dim, config,
                              self.rope_theta, rope_positions)
        new.layers = [store.copy() for store in self.layers]
        T = self.length
        for store in new.layers:
            new._evict(store, store.observed, T)
            new.max_entries = max(new.max_entries, store.n)
        new.length, new.num_forwards = self.length, 1
        return new
