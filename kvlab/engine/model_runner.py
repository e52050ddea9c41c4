"""The model runner: turns a step's `Schedule` into one packed forward pass over the paged cache.

All new tokens of all scheduled sequences are concatenated into one row (B = 1, T = N), with
their absolute positions for RoPE. The paged cache gets the step's AttentionMetadata: where each
new token's K/V goes (slot mapping), which rows belong to which sequence (query_start_loc), how
long each context is, and each sequence's block table. Logits are computed only for the last new
token of each sequence that samples this step (not after a chunk that ends inside the prompt).

The runner reads sequences and writes nothing into them. It owns the cache's step boundary:

    cache.begin_step(metadata, freed_blocks)   # first the blocks dropped since the last step let
                                               # go of their per-block state, then this step's
                                               # rows open (int4 residual rows, sink rows)
    model(...)                                 # every layer: cache.attend(layer, q, k, v)
    cache.end_step()                           # rows of the blocks this step sealed close

`end_step` runs even when the forward raises, so a failed step leaves no row open.
"""
from __future__ import annotations

import torch

from kvlab.cache.paged import AttentionMetadata


def _spans(items) -> list[tuple]:
    """(sequence, start, end) of each scheduled item; a bare Sequence (the chapters' use) means
    its tokens from `num_computed_tokens` on: `num_scheduled_tokens` of them if it carries that
    (chapter 11's exercise, through kvlab.course.plugins), else all the rest."""
    out = []
    for it in items:
        if hasattr(it, "seq"):
            out.append((it.seq, it.start, it.end))
        else:
            start, n = it.num_computed_tokens, getattr(it, "num_scheduled_tokens", 0)
            out.append((it, start, start + n if n else len(it)))
    return out


class ModelRunner:
    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.block_size = cache.block_size
        self.device = cache.device

    def prepare(self, items):
        """Scheduled items (or sequences) -> input_ids [1, N], positions [1, N], AttentionMetadata,
        logit_indices [S] (the last new token of each)."""
        spans = _spans(items)
        input_ids, positions, qsl = [], [], [0]
        for seq, start, end in spans:
            if not 0 <= start < end <= len(seq):
                raise RuntimeError(f"sequence {seq.seq_id} has no token to compute ({start}..{end})")
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))             # RoPE: the original positions
            qsl.append(qsl[-1] + end - start)
        dev = self.device
        groups = [self._group_metadata(spans, g, qsl) for g in range(getattr(self.cache, "num_kv_groups", 1))]
        meta = groups[0]
        if len(groups) > 1:
            meta = AttentionMetadata(meta.slot_mapping, meta.query_start_loc, meta.context_lens,
                                     meta.block_tables, meta.is_decode, groups=groups)
        scored = [getattr(it, "score_from", None) for it in items]
        if any(f is not None for f in scored):              # a KV budget that reads attention
            meta.score_rows = torch.tensor(
                [f is not None and p >= f for (_, a, b), f in zip(spans, scored) for p in range(a, b)],
                dtype=torch.bool, device=dev)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev).unsqueeze(0)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev).unsqueeze(0)
        logit_indices = meta.query_start_loc[1:].long() - 1
        return ids, pos, meta, logit_indices

    def _group_metadata(self, spans, group: int, qsl) -> AttentionMetadata:
        """The metadata of KV cache group `group` (0 with one group), in its cache indices: a
        sequence that dropped leading entries (a KV budget's `num_evicted_tokens`, or a windowed
        group's leading NO_BLOCK entries, kvlab/engine/kv_groups.py) stores position p at index
        p - dropped."""
        bs = self.block_size
        slots, ctx, tables = [], [], []
        for seq, start, end in spans:
            table = seq.kv_group_tables[group] if group else seq.block_table
            lead = 0
            while lead < len(table) and table[lead] < 0:    # let go: the table starts after them
                lead += 1
            table = table[lead:] if lead else table
            off = getattr(seq, "num_evicted_tokens", 0) + lead * bs
            if len(table) * bs < end - off:
                raise RuntimeError(f"sequence {seq.seq_id}: {len(table)} blocks cannot "
                                   f"hold {end - off} entries")
            slots.extend(table[c // bs] * bs + c % bs for c in range(start - off, end - off))
            ctx.append(end - off)                           # entries after this step's write
            tables.append(table)
        max_blocks = max(len(t) for t in tables)
        dev = self.device
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            block_tables=torch.tensor([t + [-1] * (max_blocks - len(t)) for t in tables],
                                      dtype=torch.int32, device=dev),
            is_decode=qsl[-1] == len(spans),
        )

    def release(self, freed_blocks) -> None:
        """Hand blocks whose contents were dropped to the cache (a step with no forward)."""
        if freed_blocks:
            self.cache.begin_step(None, freed_blocks)
            self.cache.end_step()

    @torch.inference_mode()
    def run(self, schedule) -> torch.Tensor:
        """One forward pass over the schedule -> next-token logits [S, vocab] of the items that
        sample (`ScheduledChunk.samples`), in schedule order."""
        items = schedule.items
        if not items:
            self.release(schedule.freed_blocks)
            return torch.empty(0, 0)
        ids, pos, meta, logit_indices = self.prepare(items)
        keep = [i for i, it in enumerate(items) if it.samples]
        if len(keep) < len(items):
            logit_indices = logit_indices[keep]
        meta.compactions = list(getattr(schedule, "compactions", ()))
        self.cache.begin_step(meta, schedule.freed_blocks)
        try:
            return self.model(ids, positions=pos, cache=self.cache, logit_indices=logit_indices)
        finally:
            self.cache.end_step()
