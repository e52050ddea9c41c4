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
        bs = self.block_size
        spans = _spans(items)
        input_ids, positions, slots, qsl, ctx = [], [], [], [0], []
        for seq, start, end in spans:
            if not 0 <= start < end <= len(seq):
                raise RuntimeError(f"sequence {seq.seq_id} has no token to compute ({start}..{end})")
            off = getattr(seq, "num_evicted_tokens", 0)     # a KV budget's dropped entries
            if len(seq.block_table) * bs < end - off:
                raise RuntimeError(f"sequence {seq.seq_id}: {len(seq.block_table)} blocks cannot "
                                   f"hold {end - off} entries")
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))             # RoPE: the original positions
            table = seq.block_table
            slots.extend(table[c // bs] * bs + c % bs for c in range(start - off, end - off))
            qsl.append(qsl[-1] + end - start)
            ctx.append(end - off)                           # entries after this step's write
        max_blocks = max(len(s.block_table) for s, _, _ in spans)
        tables = [s.block_table + [-1] * (max_blocks - len(s.block_table)) for s, _, _ in spans]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            is_decode=qsl[-1] == len(spans),
        )
        scored = [getattr(it, "score_from", None) for it in items]
        if any(f is not None for f in scored):              # a KV budget that reads attention
            meta.score_rows = torch.tensor(
                [f is not None and p >= f for (_, a, b), f in zip(spans, scored) for p in range(a, b)],
                dtype=torch.bool, device=dev)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev).unsqueeze(0)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev).unsqueeze(0)
        logit_indices = meta.query_start_loc[1:].long() - 1
        return ids, pos, meta, logit_indices

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
