"""The model runner: turns a list of scheduled sequences into one packed forward pass.

All new tokens of all scheduled sequences are concatenated into one row (B = 1, T = N), with
their absolute positions for RoPE. The paged cache gets the step's AttentionMetadata: where each
new token's K/V goes (slot mapping), which rows belong to which sequence (query_start_loc), how
long each context is, and each sequence's block table. Logits are computed only for the last new
token of each sequence, the one that predicts its next token (the engine samples it only when the
sequence's tokens are all computed: not after a chunk that ends inside the prompt).
"""
from __future__ import annotations

import torch

from kvlab.cache.paged import AttentionMetadata, PagedKVCache
from kvlab.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.block_size = cache.block_size
        self.device = cache.device

    def prepare(self, seqs: list[Sequence]):
        """-> input_ids [1, N], positions [1, N], AttentionMetadata, logit_indices [S]."""
        bs = self.block_size
        input_ids, positions, slots, qsl, ctx = [], [], [], [0], []
        for seq in seqs:
            start = seq.num_computed_tokens
            end = start + seq.num_scheduled_tokens if seq.num_scheduled_tokens else len(seq)
            if not 0 <= start < end <= len(seq):
                raise RuntimeError(f"sequence {seq.seq_id} has no token to compute ({start}..{end})")
            if len(seq.block_table) * bs < end:
                raise RuntimeError(f"sequence {seq.seq_id}: {len(seq.block_table)} blocks cannot "
                                   f"hold {end} tokens")
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(qsl[-1] + end - start)
            ctx.append(end)
        max_blocks = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [-1] * (max_blocks - len(s.block_table)) for s in seqs]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            is_decode=qsl[-1] == len(seqs),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev).unsqueeze(0)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev).unsqueeze(0)
        logit_indices = meta.query_start_loc[1:].long() - 1
        return ids, pos, meta, logit_indices

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """One forward pass over the scheduled sequences -> next-token logits [S, vocab]."""
        ids, pos, meta, logit_indices = self.prepare(seqs)
        self.cache.set_metadata(meta)
        try:
            logits = self.model(ids, positions=pos, cache=self.cache, logit_indices=logit_indices)
        finally:
            self.cache.metadata = None
        for seq in seqs:   # num_scheduled_tokens is per step; 0 (not set) means "all the rest"
            seq.num_computed_tokens = (seq.num_computed_tokens + seq.num_scheduled_tokens
                                       if seq.num_scheduled_tokens else len(seq))
            seq.num_scheduled_tokens = 0
        return logits
