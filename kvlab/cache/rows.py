"""The full-precision rows beside a quantized paged cache: KIVI's residual rows and the sink rows.

One owner for both kinds of row a quantized cache keeps in the model's dtype (docs/architecture.md
section 4):

- **residual rows** (int4 / int2, `kvlab.quant.residual.Int4Residual`): one block's worth of
  tokens for every block that is still filling or was sealed in this step;
- **sink rows** (`keep_sink_token`, kvlab.quant.sink): each sequence's position-0 token, one token
  a row, owned by the sequence's first block.

`RowPool` follows the step: `begin_step` takes back the rows of the blocks dropped since the last
step, then opens this step's residual rows and sink rows; the cache writes tokens into them
(`write`), reads blocks through them (`overlay`), hands them to the kernels (`kernel_args`), and
`close` gives the sealed blocks' residual rows back after the step's last layer. In the engine both
pools are preallocated inside the KV budget (`residual_rows`, `sink_rows`: kvlab/engine/kv_budget.py)
and never grow; built alone (kernel tests) they start at 16 rows and grow and shrink as needed.
"""
from __future__ import annotations

import torch

from kvlab.quant.residual import Int4Residual, sealed_blocks
from kvlab.quant.sink import create_sink_pool, sink_args, sink_blocks


class RowPool:
    """RowPool(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device,
    residual, sinks, residual_rows=None, sink_rows=None)

    `residual`: keep KIVI's residual rows; `sinks`: keep sink rows. `residual_rows` / `sink_rows`:
    preallocate exactly that many, fixed; None: 16 to start, growing as needed."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device, residual: bool, sinks: bool,
                 residual_rows: int | None = None, sink_rows: int | None = None):
        self.block_size = block_size
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
        self.residual = Int4Residual.create(*shape, residual_rows or 16, fixed=residual_rows is not None) \
            if residual else None
        self.sinks = create_sink_pool(num_layers, num_blocks, num_kv_heads, head_dim, dtype, device,
                                      sink_rows or 16, fixed=sink_rows is not None) if sinks else None

    @property
    def residual_bytes(self) -> int:
        return self.residual.nbytes if self.residual is not None else 0

    @property
    def sink_bytes(self) -> int:
        return self.sinks.nbytes if self.sinks is not None else 0

    @property
    def nbytes(self) -> int:
        return self.residual_bytes + self.sink_bytes

    @property
    def residual_rows_in_use(self) -> int:
        return self.residual.rows_in_use if self.residual is not None else 0

    def _pools(self):
        return [p for p in (self.residual, self.sinks) if p is not None]

    # ---- the step -----------------------------------------------------------------------------
    def discard(self, block_ids) -> None:
        """These blocks' contents were dropped: their residual and sink rows go back."""
        block_ids = list(block_ids)
        for pool in self._pools():
            pool.discard(block_ids)

    def begin_step(self, metadata, freed_blocks=()) -> None:
        """Rows of the freed blocks back first (one may be written again this step), then a
        residual row for every block the step writes, a sink row for every first block whose
        offset 0 it writes."""
        self.discard(freed_blocks)
        if metadata is None:
            return
        if self.residual is not None:
            self.residual.open(metadata.slot_mapping)
        if self.sinks is not None:
            self.sinks.assign(sink_blocks(metadata.block_tables, metadata.slot_mapping, self.block_size))

    def close(self, slot_mapping: torch.Tensor) -> None:
        """After the step's last layer: the blocks it sealed give their residual rows back."""
        if self.residual is not None:
            self.residual.close(slot_mapping)

    # ---- tokens in and out (the PyTorch reference) ---------------------------------------------
    def write_residual(self, layer: int, k, v, slots) -> torch.Tensor:
        """Store k, v [N, Hkv, D] in their blocks' residual rows; returns the block ids whose last
        slot this write filled (the blocks to seal)."""
        res, BS = self.residual, self.block_size
        rows = res.res_slot[slots // BS].long()
        if bool((rows < 0).any()):
            raise RuntimeError("int4 write to a block without a residual row: call set_metadata "
                               "with this step's slot mapping first")
        flat = rows * BS + slots % BS
        for x, pool in ((k, res.k_res[layer]), (v, res.v_res[layer])):
            pool.view(-1, *pool.shape[2:]).index_copy_(0, flat, x.to(pool.dtype))
        return sealed_blocks(slots, BS)

    def residual_blocks(self, layer: int, blocks: torch.Tensor):
        """The full-precision K, V [len(blocks), BS, Hkv, D] of blocks that hold a residual row."""
        rows = self.residual.res_slot[blocks].long()
        return self.residual.k_res[layer][rows], self.residual.v_res[layer][rows]

    def has_sink(self, blocks: torch.Tensor) -> torch.Tensor:
        """bool per block id: does it hold a sink row (its offset-0 token is a sink)?"""
        if self.sinks is None:
            return torch.zeros(blocks.shape, dtype=torch.bool, device=blocks.device)
        return self.sinks.res_slot[blocks] >= 0

    def write_sinks(self, layer: int, k, v, slots) -> None:
        """The offset-0 tokens of blocks with a sink row are also kept unquantized there."""
        if self.sinks is None:
            return
        rows = self.sinks.res_slot[slots // self.block_size].long()
        hit = (slots % self.block_size == 0) & (rows >= 0)
        if bool(hit.any()):
            for x, pool in ((k, self.sinks.k_res[layer]), (v, self.sinks.v_res[layer])):
                pool[rows[hit], 0] = x[hit].to(pool.dtype)

    def overlay(self, layer: int, blocks: torch.Tensor, k, v, load_keys) -> tuple:
        """Decoded blocks k, v [len(blocks), BS, Hkv, D]: tokens of blocks with a residual row
        replaced by the row, offset-0 tokens with a sink row by the sink (`load_keys(layer, x)`
        turns stored keys back into keys: fp8's shift)."""
        if self.residual is not None:
            rows = self.residual.res_slot[blocks].long()
            hot = rows >= 0
            if bool(hot.any()):  # partial blocks, and blocks sealed this step
                k[hot] = self.residual.k_res[layer][rows[hot]].to(k.dtype)
                v[hot] = self.residual.v_res[layer][rows[hot]].to(v.dtype)
        if self.sinks is not None:
            rows = self.sinks.res_slot[blocks].long()
            hot = rows >= 0
            if bool(hot.any()):
                k[hot, 0] = load_keys(layer, self.sinks.k_res[layer][rows[hot], 0]).to(k.dtype)
                v[hot, 0] = self.sinks.v_res[layer][rows[hot], 0].to(v.dtype)
        return k, v

    def kernel_args(self, layer: int) -> dict:
        """The row keyword arguments of kvlab.attention.paged_triton for one layer."""
        a = self.residual.args(layer) if self.residual is not None else {}
        return a | (sink_args(self.sinks, layer) if self.sinks is not None else {})
