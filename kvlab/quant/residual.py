"""The int4 (KIVI) residual window of a paged cache: full-precision rows for blocks not yet sealed.

int4 keys are quantized per channel over a whole block (kvlab.quant.int4: key group = block_size),
so the tokens of a block that is still filling cannot be quantized yet. They wait, in the model's
dtype, in a *residual pool* shared by both attention backends (docs/architecture.md section 4):

    k_res, v_res   one [R, BS, Hkv, D] pool per layer (model dtype): R rows, each one block's worth
    res_slot       int32 [NB], shared by the layers (a block id means the same slots in every
                   layer): the pool row of block b, or -1 once b is quantized ("sealed")

The timing of one engine step, the same for the PyTorch path and the Triton kernels:

1. `open(slot_mapping)` before the step's first layer: every block the step writes that has no row
   gets one (the pool grows, doubling, when no row is free).
2. Each layer writes its new rows into the pool, then quantizes every block whose *last* slot the
   step wrote (`sealed_blocks`) into the packed codes, scales and zeros. The block keeps its row,
   so this step's attention still reads it in full precision: the queries of a prefill attend over
   their own block unquantized, as in KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit
   Quantization for KV Cache"), and a decode step sees what kvlab.quant.sim.FakeQuantKVCache shows.
3. `close(slot_mapping)` after the step's last layer: the sealed blocks give their rows back
   (res_slot = -1); from the next step on they are read from their codes.

A block freed while partial keeps its row until it is filled again, so the pool holds at most one
row per block id, and in practice about one per running sequence plus the blocks a step fills.
Rows are handed out in a fixed order, so two caches driven through the same steps hold the same
bytes in the same rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def sealed_blocks(slot_mapping: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block ids whose last slot `slot_mapping` writes (slots < 0 are padding): the blocks a step
    quantizes, on either backend (the int4 write kernel re-exports this function)."""
    s = slot_mapping[slot_mapping >= 0]
    return s[s % block_size == block_size - 1] // block_size


@dataclass
class Int4Residual:
    """The residual pool of every layer (see the module docstring); `free` lists unused rows."""
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
        for b in sealed_blocks(slot_mapping, self.block_size).tolist():
            if int(self.res_slot[b]) >= 0:
                self.free.append(int(self.res_slot[b]))
                self.res_slot[b] = -1

    def args(self, layer: int) -> dict:
        """The residual keyword arguments of the int4 kernels for one layer."""
        return dict(k_res=self.k_res[layer], v_res=self.v_res[layer], res_slot=self.res_slot)
