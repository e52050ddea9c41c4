"""Paged attention on the Triton kernels of kvlab/kernels/, with the signatures of paged_torch.

    reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)                 cache write
    paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale)

Quantized caches (int8, float8_e4m3fn) take two extra keyword arguments, `k_scale` and `v_scale`
(docs/architecture.md, section 4); for a model-dtype cache they stay None. An int4 cache (uint8,
two channels per byte) takes k_scale, v_scale and five more: k_zero, v_zero, the full-precision
residual pool k_res, v_res [R, BS, Hkv, D] and res_slot int32 [NB] (block -> residual row, -1 once
quantized); kvlab/kernels/reshape_and_cache_int4.py describes them. The int4 write quantizes a
block as soon as its last slot is written but leaves its residual row mapped, so this step's
attention still reads it in full precision, as kvlab.quant.paged does; after the attention the
caller unmaps the blocks `int4_sealed_blocks(slot_mapping, block_size)` names. `Int4Residual`
does that bookkeeping for a whole model: `open` before a step's first layer, `close` after its
last, `args(layer)` for the kernels in between.

Decode uses version 3 (split-K with fused dequantization). Prefill over cached prefix blocks
reuses the same kernel: query i of sequence s, at absolute position context_len - q_len + i, is a
decode query whose own context is that position + 1 tokens of s's block table. Each packed token
becomes one row of a per-token block table and length, and one launch serves the whole packed
batch. That is exact and reads each K/V tile once per query token and KV head, which is fine for
the chunk sizes this engine schedules; a prefill kernel tiled over queries as well (FlashAttention
style) would read each tile once per query *tile* and is the next step for long prompts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.kernels._checks import check_tensor
from kvlab.kernels.decode_attention_v3 import paged_decode_attention_v3
from kvlab.kernels.reshape_and_cache import reshape_and_cache as _reshape_and_cache
from kvlab.kernels.reshape_and_cache_int4 import sealed_blocks as int4_sealed_blocks

__all__ = ["reshape_and_cache", "paged_decode_attention", "paged_prefill_attention",
           "int4_sealed_blocks", "Int4Residual"]


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None,
                      **int4) -> None:
    """Write k, v [N, Hkv, D] into the slots `slot_mapping` [N] int64 (< 0: skipped)."""
    _reshape_and_cache(k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping,
                       k_scale, v_scale, **int4)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                           k_scale=None, v_scale=None, **int4) -> torch.Tensor:
    """One query per sequence, q [S, Hq, D] -> [S, Hq, D]."""
    return paged_decode_attention_v3(q.contiguous(), k_cache, v_cache, block_tables,
                                     context_lens, scale, k_scale=k_scale, v_scale=v_scale, **int4)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                            scale, k_scale=None, v_scale=None, **int4) -> torch.Tensor:
    """Packed queries q [N, Hq, D]; sequence s owns rows query_start_loc[s]:query_start_loc[s+1],
    the last q_len positions of its context_lens[s] tokens -> [N, Hq, D]."""
    N = q.shape[0]
    S = context_lens.shape[0]
    check_tensor("query_start_loc", query_start_loc, dtypes=(torch.int32,), ndim=1,
                 shape=(S + 1,), device=q.device)
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), ndim=1, device=q.device)
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(S, device=q.device), q_lens, output_size=N)
    idx = torch.arange(N, device=q.device)
    first = (context_lens.long() - q_lens)[seq]                 # absolute position of row 0
    pos = first + idx - query_start_loc[:-1].long()[seq]
    tok_ctx = (pos + 1).to(torch.int32)
    tok_tables = block_tables[seq].contiguous()
    return paged_decode_attention_v3(q.contiguous(), k_cache, v_cache, tok_tables, tok_ctx,
                                     scale, k_scale=k_scale, v_scale=v_scale, **int4)


@dataclass
class Int4Residual:
    """The int4 residual window of every layer: full-precision rows for blocks not yet sealed.

    k_res, v_res: one [R, BS, Hkv, D] pool per layer (model dtype); res_slot int32 [NB], shared by
    the layers (a block id means the same slots in each), -1 for a sealed block; free: rows not in
    use. A block gets a row when a step first writes it and gives it back after the step that
    wrote its last slot, as kvlab.quant.paged's residual table holds a block from its first write
    until it is quantized (a block freed while partial keeps its row until it is filled again).
    The pool grows (doubling) when a step needs more rows than are free: at most one row per
    running sequence plus the blocks a step fills.
    """
    block_size: int
    k_res: list
    v_res: list
    res_slot: torch.Tensor
    free: list

    @classmethod
    def create(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
               head_dim: int, dtype: torch.dtype = torch.float32, device="cpu", rows: int = 16):
        if rows <= 0:
            raise ValueError(f"Int4Residual needs at least one row, got rows={rows}")
        pool = [torch.zeros(rows, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
                for _ in range(2 * num_layers)]
        return cls(block_size, pool[:num_layers], pool[num_layers:],
                   torch.full((num_blocks,), -1, dtype=torch.int32, device=device),
                   list(range(rows - 1, -1, -1)))

    @property
    def rows_in_use(self) -> int:
        return self.k_res[0].shape[0] - len(self.free)

    def _grow(self, need: int) -> None:
        R = self.k_res[0].shape[0]
        new = max(2 * R, R + need)
        for pools in (self.k_res, self.v_res):
            for i, p in enumerate(pools):
                pools[i] = torch.cat([p, p.new_zeros(new - R, *p.shape[1:])])
        self.free = list(range(new - 1, R - 1, -1)) + self.free

    def open(self, slot_mapping: torch.Tensor) -> None:
        """Before a step's first layer: a residual row for every block it writes that has none."""
        s = slot_mapping[slot_mapping >= 0]
        blocks = (s // self.block_size).unique()
        blocks = blocks[self.res_slot[blocks] < 0].tolist()
        if len(blocks) > len(self.free):
            self._grow(len(blocks) - len(self.free))
        for b in blocks:
            self.res_slot[b] = self.free.pop()

    def close(self, slot_mapping: torch.Tensor) -> None:
        """After a step's last layer: the blocks it sealed give their rows back."""
        for b in int4_sealed_blocks(slot_mapping, self.block_size).tolist():
            self.free.append(int(self.res_slot[b]))
            self.res_slot[b] = -1

    def args(self, layer: int) -> dict:
        """The residual keyword arguments of the int4 kernels for one layer."""
        return dict(k_res=self.k_res[layer], v_res=self.v_res[layer], res_slot=self.res_slot)
