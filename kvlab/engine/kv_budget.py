"""How the KV cache's memory is split at start-up, so that it never grows afterwards.

Everything the KV cache holds comes out of one budget, `kv_cache_memory_bytes` (or, given
`num_kv_blocks`, the bytes those blocks need plus their rows), allocated when the engine is built:

- the **blocks**: codes and scales (`bytes_per_block` each, all layers, K and V);
- int4 / int2's **residual rows** (kvlab/quant/residual.py): one full-precision block per block
  that is partially written or sealed in the current step. Every row belongs to a distinct block
  in use, and a step holds at most one partial block per running sequence plus the blocks it
  writes, so `min(num_blocks, ceil(max_num_batched_tokens / block_size) + 2 * max_num_seqs)` rows
  always suffice: any schedule the scheduler may plan (at most `max_num_seqs` sequences and
  `max_num_batched_tokens` tokens) fits; admission counts rows as well (kvlab/engine/row_budget.py),
  so a pool smaller than this bound would make requests wait, never overflow;
- **sink rows** (`keep_sink_token`, kvlab/quant/sink.py): one token per first block that is in
  use (at most `max_num_seqs`) or cached; the block manager keeps at most `max_num_seqs` free
  cached first blocks (`max_cached_first_blocks`), so `min(num_blocks, 2 * max_num_seqs)` rows;
- a few fixed bytes (fp8's per-layer scales and key shifts; the int32 row index per block).

`plan_kv_pool` finds the largest number of blocks whose total fits the budget. The figure is
`kvlab.LLM.kv_cache_bytes_allocated`, the bytes of every tensor the cache holds; tests check it
never exceeds the budget and never changes while requests come and go.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_KV_CACHE_BYTES = 512 * 2**20   # when neither num_kv_blocks nor kv_cache_memory_bytes is given


@dataclass
class KVPoolPlan:
    num_blocks: int
    residual_rows: int          # 0 unless int4 / int2
    sink_rows: int              # 0 unless keep_sink_token
    total_bytes: int            # what the cache allocates: blocks + rows + fixed


@dataclass
class KVCosts:
    """Bytes of one block, one residual row, one sink row (0 when not used), the per-block index
    of each pool, and the fixed bytes; `max_residual_rows` / `max_sink_rows` before the num_blocks cap."""
    bytes_per_block: int
    residual_row_bytes: int = 0
    sink_row_bytes: int = 0
    index_bytes_per_block: int = 0
    fixed_bytes: int = 0
    max_residual_rows: int = 0
    max_sink_rows: int = 0

    def plan(self, num_blocks: int) -> KVPoolPlan:
        r = min(num_blocks, self.max_residual_rows) if self.residual_row_bytes else 0
        s = min(num_blocks, self.max_sink_rows) if self.sink_row_bytes else 0
        total = (num_blocks * (self.bytes_per_block + self.index_bytes_per_block)
                 + r * self.residual_row_bytes + s * self.sink_row_bytes + self.fixed_bytes)
        return KVPoolPlan(num_blocks, r, s, total)


def plan_kv_pool(costs: KVCosts, budget: int | None = None, num_blocks: int | None = None) -> KVPoolPlan:
    """num_blocks given: its plan. Else the most blocks whose plan fits `budget` bytes."""
    if num_blocks is not None:
        if num_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {num_blocks}")
        return costs.plan(num_blocks)
    lo, hi = 0, max(1, budget // max(1, costs.bytes_per_block))     # plan(n).total is increasing
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if costs.plan(mid).total_bytes <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        one = costs.plan(1).total_bytes
        raise ValueError(f"kv_cache_memory_bytes={budget} is less than one block with its rows "
                         f"({one} bytes)")
    return costs.plan(lo)


def kv_costs(fmt: str, codec, shape: dict, dtype: torch.dtype, max_num_seqs: int,
             max_num_batched_tokens: int, keep_sink_token: bool) -> KVCosts:
    """The costs of format `fmt` ("auto", "int8", "fp8", "int4", "int2", or "codec" with `codec`)
    for a model of `shape` (num_layers, block_size, num_kv_heads, head_dim) whose dtype is `dtype`."""
    L, BS, H, D = (shape[k] for k in ("num_layers", "block_size", "num_kv_heads", "head_dim"))
    if fmt == "auto":
        from kvlab.cache.paged import PagedKVCache
        return KVCosts(PagedKVCache.bytes_per_block(**shape, dtype=dtype))
    if fmt == "codec":
        from kvlab.cache.codec import CodecPagedKVCache
        return KVCosts(CodecPagedKVCache.bytes_per_block(codec, **shape))
    from kvlab.cache.quantized import QuantizedPagedKVCache
    itemsize = torch.empty((), dtype=dtype).element_size()
    costs = KVCosts(QuantizedPagedKVCache.bytes_per_block(**shape, dtype=dtype, kv_cache_dtype=fmt),
                    fixed_bytes=QuantizedPagedKVCache.fixed_bytes(L, H, D, fmt))
    if fmt in ("int4", "int2"):
        costs.residual_row_bytes = 2 * L * BS * H * D * itemsize
        costs.max_residual_rows = -(-max_num_batched_tokens // BS) + 2 * max_num_seqs
        costs.index_bytes_per_block += 4
    if keep_sink_token:
        costs.sink_row_bytes = 2 * L * H * D * itemsize
        costs.max_sink_rows = 2 * max_num_seqs
        costs.index_bytes_per_block += 4
    return costs
