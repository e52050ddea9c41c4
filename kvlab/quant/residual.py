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

4. `discard(block)` when the block manager frees a block whose contents nobody will read again
   (a sequence's partial last block when it finishes, is aborted or preempted): its row goes back.

So the pool holds one row per running sequence plus the blocks one step fills. In the engine it is
*fixed* (`fixed=True`): preallocated at start-up out of the KV budget with enough rows for any
step the scheduler may plan (kvlab/engine/kv_budget.py), it never grows, and running out is a
bug (RuntimeError). Built alone (the tests of the kernels), it grows, doubling, to what a step
needs, and shrinks back (to twice the rows in use, at least its initial size) once three quarters
of it are free, moving the rows in use to the front. Rows are handed out and moved in a fixed
order, so two caches driven through the same steps hold the same bytes in the same rows.
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
    min_rows: int = 16
    fixed: bool = False                 # preallocated: never grows or shrinks

    @classmethod
    def create(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
               head_dim: int, dtype: torch.dtype = torch.float32, device="cpu", rows: int = 16,
               fixed: bool = False):
        if rows <= 0:
            raise ValueError(f"Int4Residual needs at least one row, got rows={rows}")
        pool = [torch.zeros(rows, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
                for _ in range(2 * num_layers)]
        return cls(block_size, pool[:num_layers], pool[num_layers:],
                   torch.full((num_blocks,), -1, dtype=torch.int32, device=device),
                   list(range(rows - 1, -1, -1)), rows, fixed)

    @property
    def rows_in_use(self) -> int:
        return self.k_res[0].shape[0] - len(self.free)

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds now (all layers, K and V, and the row index), in use or not."""
        return sum(p.numel() * p.element_size() for p in self.k_res + self.v_res) + \
            self.res_slot.numel() * self.res_slot.element_size()

    def _shrink(self) -> None:
        """Once 3/4 of the rows are free: keep max(min_rows, 2 x in use), rows in use moved to the
        front in their current order."""
        if self.fixed:
            return
        R, used = self.k_res[0].shape[0], self.rows_in_use
        keep = max(self.min_rows, 2 * used)
        if used * 4 > R or keep >= R:
            return
        blocks = (self.res_slot >= 0).nonzero().flatten()
        rows = self.res_slot[blocks].long()
        order = rows.argsort()
        blocks, rows = blocks[order], rows[order]
        for pools in (self.k_res, self.v_res):
            for i, p in enumerate(pools):
                new = p.new_zeros(keep, *p.shape[1:])
                new[:used] = p[rows]
                pools[i] = new
        self.res_slot[blocks] = torch.arange(used, dtype=self.res_slot.dtype, device=self.res_slot.device)
        self.free = list(range(keep - 1, used - 1, -1))

    def _grow(self, need: int) -> None:
        R = self.k_res[0].shape[0]
        if self.fixed:
            raise RuntimeError(f"the preallocated pool of {R} rows is full ({need} more needed): "
                               "the engine sized it for every step it can schedule, so this is a bug")
        new = max(2 * R, R + need)
        for pools in (self.k_res, self.v_res):
            for i, p in enumerate(pools):
                pools[i] = torch.cat([p, p.new_zeros(new - R, *p.shape[1:])])
        self.free = list(range(new - 1, R - 1, -1)) + self.free

    def open(self, slot_mapping: torch.Tensor) -> None:
        """Before a step's first layer: a residual row for every block it writes that has none."""
        s = slot_mapping[slot_mapping >= 0]
        self.assign((s // self.block_size).unique())

    def assign(self, blocks: torch.Tensor) -> None:
        """A row for each of these (distinct) block ids that has none; the pool grows if needed."""
        blocks = blocks[self.res_slot[blocks] < 0].tolist()
        if len(blocks) > len(self.free):
            self._grow(len(blocks) - len(self.free))
        for b in blocks:
            self.res_slot[b] = self.free.pop()

    def close(self, slot_mapping: torch.Tensor) -> None:
        """After a step's last layer: the blocks it sealed give their rows back."""
        self.discard(sealed_blocks(slot_mapping, self.block_size).tolist())

    def discard(self, blocks) -> None:
        """The rows of these block ids (those that have one) go back to the pool; it may shrink."""
        for b in blocks:
            r = int(self.res_slot[b])
            if r >= 0:
                self.free.append(r)
                self.res_slot[b] = -1
        self._shrink()

    def args(self, layer: int) -> dict:
        """The residual keyword arguments of the int4 kernels for one layer."""
        return dict(k_res=self.k_res[layer], v_res=self.v_res[layer], res_slot=self.res_slot)
