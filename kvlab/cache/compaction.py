"""The cache's side of a per-sequence KV budget: copying the kept entries, and scoring them.

kvlab/engine/kv_eviction.py decides *when* a sequence is cut and gives it a new block table; this
module does the tensor work, for a paged cache of any per-token layout (full precision, int8, fp8):

- `compact(cache, compactions)`, at the start of a step, before the forward writes anything: for
  each cut, per layer, the selection rule of kvlab/evict/policy.py picks the entries to keep
  (per KV head for h2o and snapkv, the same for every head otherwise), and every per-slot tensor
  of the layer (keys, values, their scales, the scores) is gathered from the old slots and written,
  in order, to slots 0.. of the new table. All reads of a layer happen before its writes, so the
  new table may reuse the old table's blocks. Codes and scales move as they are: a cut never
  re-quantizes;
- `observe(cache, layer, q, metadata)`, after a layer's attention: the softmax probabilities of
  the step's scored queries (`metadata.score_rows`) over their sequence's entries, summed over the
  queries and the query heads of each KV head, are added to the entries' scores (H2O's accumulated
  attention; SnapKV's observation window). The attention kernels never return probabilities, so
  they are recomputed here in PyTorch, in float32 at least; a new entry's score starts at zero.

Scores cost 4 bytes (8 for a float64 model) per slot, KV head and layer, inside the KV budget
(kvlab/engine/kv_budget.py).
"""
from __future__ import annotations

import torch

from kvlab.evict.policy import pool_scores, select_keep


def table_slots(table, num_entries: int, block_size: int, device) -> torch.Tensor:
    """The flat slots of entries 0..num_entries-1 of a block table, [num_entries] int64."""
    idx = torch.arange(num_entries, device=device)
    blocks = torch.as_tensor(table, dtype=torch.int64, device=device)      # a list or a tensor
    return blocks[idx // block_size] * block_size + idx % block_size


def _movable(t: torch.Tensor) -> torch.Tensor:
    """t, or its bytes when its dtype has no gather kernel (float8 on the CPU)."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def score_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Scores are summed in float32, or float64 for a float64 model (the twin's equality tests)."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


class KVCompactor:
    """KVCompactor(num_layers, num_slots, num_kv_heads, model_dtype, device, scores=False)."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, model_dtype: torch.dtype,
                 device, scores: bool = False):
        self.score_dtype = score_dtype(model_dtype)
        self.scores = [torch.zeros(num_slots, num_kv_heads, dtype=self.score_dtype, device=device)
                       for _ in range(num_layers)] if scores else None

    @staticmethod
    def score_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int,
                              model_dtype: torch.dtype) -> int:
        return num_layers * block_size * num_kv_heads * score_dtype(model_dtype).itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.scores) if self.scores else 0

    # ---- the cut ---------------------------------------------------------------------------
    def compact(self, cache, compactions) -> None:
        bs, H = cache.block_size, cache.num_kv_heads
        for c in compactions:
            old = table_slots(c.old_table, c.num_entries, bs, cache.device)
            new = table_slots(c.new_table, c.num_keep, bs, cache.device)
            shared = None
            for layer in range(cache.num_layers):
                tensors = [_movable(t) for t in cache.slot_views(layer)]
                tensors += [self.scores[layer]] if self.scores else []
                if c.scored:
                    s = self.scores[layer].index_select(0, old).T          # [H, n]
                    if c.config.policy == "snapkv":
                        s = pool_scores(s, c.config.pool)
                    keep = select_keep(c.config, c.num_entries, c.pinned, s, shape=(H,))  # [H, k]
                    for t in tensors:
                        src = t.index_select(0, old)                        # [n, H, ...]
                        idx = keep.T.reshape(c.num_keep, H, *(1,) * (t.dim() - 2))
                        t.index_copy_(0, new, src.gather(0, idx.expand(c.num_keep, *src.shape[1:])))
                else:
                    if shared is None:                                      # the same for every layer
                        shared = old[select_keep(c.config, c.num_entries, c.pinned, shape=())]
                    for t in tensors:
                        t.index_copy_(0, new, t.index_select(0, shared))

    # ---- the scores ------------------------------------------------------------------------
    def observe(self, cache, layer: int, q: torch.Tensor, m) -> None:
        """q [N, Hq, D] of the step; m its AttentionMetadata (this layer's new K/V are written)."""
        if self.scores is None:
            return
        score = self.scores[layer]
        new = m.slot_mapping[m.slot_mapping >= 0]
        score.index_fill_(0, new, 0)
        if m.score_rows is None:
            return
        if m.is_decode:
            self._observe_decode(cache, layer, score, q, m)
            return
        bs, H = cache.block_size, cache.num_kv_heads
        qsl, ctx = m.query_start_loc.tolist(), m.context_lens.tolist()
        rows = m.score_rows
        for s in range(len(ctx)):
            a, b, n = qsl[s], qsl[s + 1], ctx[s]
            sel = rows[a:b]
            if not bool(sel.any()):
                continue
            blocks = m.block_tables[s, :-(-n // bs)].long()
            keys = cache.context_keys(layer, blocks)[:n]                    # [n, H, D]
            slots = table_slots(blocks, n, bs, q.device)
            qs = q[a:b][sel]                                                # [r, Hq, D]
            r, Hq, D = qs.shape
            work = torch.promote_types(q.dtype, torch.float32)
            logits = torch.einsum("rhgd,nhd->hgrn", qs.view(r, H, Hq // H, D).to(work),
                                  keys.to(work)) * cache.scale
            q_idx = (n - (b - a) + torch.arange(b - a, device=q.device))[sel]   # cache indices
            hidden = torch.arange(n, device=q.device).view(1, n) > q_idx.view(r, 1)
            probs = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)
            score.index_add_(0, slots, probs.sum(dim=(1, 2)).T.to(score.dtype))

    @staticmethod
    def _observe_decode(cache, layer: int, score, q, m) -> None:
        """The same for a decode step (one query per sequence), every scored sequence at once."""
        seqs = m.score_rows.nonzero().flatten()
        if seqs.numel() == 0:
            return
        bs, H = cache.block_size, cache.num_kv_heads
        tables, n = m.block_tables[seqs].long(), m.context_lens[seqs].long()     # [S, M], [S]
        S, M = tables.shape
        keys = cache.context_keys(layer, tables.clamp(min=0).flatten()).view(S, M * bs, H, -1)
        qs = q[seqs]                                                            # [S, Hq, D]
        work = torch.promote_types(q.dtype, torch.float32)
        logits = torch.einsum("shgd,slhd->shgl", qs.view(S, H, -1, qs.shape[-1]).to(work),
                              keys.to(work)) * cache.scale
        valid = torch.arange(M * bs, device=q.device).view(1, -1) < n.view(S, 1)   # [S, L]
        probs = torch.softmax(logits.masked_fill(~valid.view(S, 1, 1, -1), float("-inf")), dim=-1)
        slots = (tables.unsqueeze(-1) * bs + torch.arange(bs, device=q.device)).view(S, -1)
        score.index_add_(0, slots[valid], probs.sum(dim=2).permute(0, 2, 1)[valid].to(score.dtype))
