"""Admission counts rows as it counts blocks: the scheduler's view of the cache's row pools.

A quantized cache keeps two kinds of full-precision row beside its blocks (kvlab/cache/rows.py),
both preallocated inside the KV budget (kvlab/engine/kv_budget.py), both fixed:

- **residual rows** (int4 / int2): during a step, one per distinct block the step writes; between
  steps, one per running sequence whose last block is partial (sealed blocks give theirs back at
  the step's end, dropped blocks at the next step's start);
- **sink rows** (`keep_sink_token`): one per distinct first block in use or cached.

`RowBudget` tells the scheduler, from sequences' progress alone (no tensor), how many rows a
planned step holds and whether one more chunk fits; the scheduler admits a sequence, or gives a
prompt in progress its next chunk, only when both its blocks and its rows fit, and shortens a
chunk to whole blocks when only a shorter one fits. kv_budget sizes the pools so that every
schedule the token budget allows fits; the count is what keeps a burst inside a smaller pool.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RowBudget:
    """The row pools' sizes (0: the cache keeps no such rows) and the block size."""
    block_size: int
    residual_rows: int = 0
    sink_rows: int = 0

    def __post_init__(self):
        for name in ("block_size", "residual_rows", "sink_rows"):
            if getattr(self, name) < 0 or (name == "block_size" and self.block_size == 0):
                raise ValueError(f"RowBudget: {name} must be {'positive' if name == 'block_size' else '>= 0'}, "
                                 f"got {getattr(self, name)}")

    # ---- residual rows ---------------------------------------------------------------------
    def rows_for(self, start: int, end: int) -> int:
        """Residual rows a chunk writing positions [start, end) holds during its step."""
        if not self.residual_rows or end <= start:
            return 0
        return (end - 1) // self.block_size - start // self.block_size + 1

    def held(self, seq) -> int:
        """Residual rows a running sequence holds between steps: its partial last block's."""
        return int(bool(self.residual_rows) and seq.num_computed_tokens % self.block_size != 0)

    def fit(self, start: int, n: int, used: int) -> int:
        """The largest chunk <= n from `start` whose rows fit beside `used` rows (whole blocks
        dropped from its end; the block `start` lies in may already hold a row, counted in used
        by the caller through `held`)."""
        if not self.residual_rows:
            return n
        BS = self.block_size
        already = int(start % BS != 0)
        while n > 0 and used + self.rows_for(start, start + n) - already > self.residual_rows:
            n = ((start + n - 1) // BS) * BS - start           # one block fewer
        return max(n, 0)

    # ---- sink rows -------------------------------------------------------------------------
    def sinks_fit(self, running, block_manager, cached_tokens: int) -> bool:
        """May a newcomer whose prefix hit is `cached_tokens` long get a sink row? It needs one
        unless it found its first block in the prefix cache (that block keeps its row)."""
        if not self.sink_rows or cached_tokens > 0:
            return True
        first = {s.block_table[0] for s in running if s.block_table}
        cached_first = getattr(block_manager, "num_cached_first_blocks", 0)
        return len(first) + cached_first + 1 <= self.sink_rows
