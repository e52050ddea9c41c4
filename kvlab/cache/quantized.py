"""The paged KV cache with quantized blocks: quantize on write, dequantize on read.

Same contract as `kvlab.cache.paged.PagedKVCache` (docs/architecture.md sections 3 and 4): the
engine constructs it with the same arguments plus `kv_cache_dtype`, sizes its pool with
`bytes_per_block`, and sets an `AttentionMetadata` before every forward. Per layer it keeps codes
and scales next to each other, block-indexed like the full-precision pool, in the layout the Triton
kernels of kvlab/kernels/ read:

| kv_cache_dtype | codes (K and V each) | scales |
|---|---|---|
| int8 | int8 `[NB, BS, Hkv, D]` | float16 `[NB, BS, Hkv]` |
| fp8  | float8_e4m3fn `[NB, BS, Hkv, D]` | float32 per layer, `[]` or `[Hkv]`; optional key shift `[Hkv, D]` |
| int4 | uint8 `[NB, BS, Hkv, D/2]` | keys float16 scale, zero `[NB, Hkv, D]`; values `[NB, BS, Hkv, D/32]` |
| int2 | uint8 `[NB, BS, Hkv, D/4]` | as int4 |

The cache is a composition of two parts, and holds no format-specific code itself:

- a **codec** (kvlab/cache/block_codecs.py, one small class per format): the block storage of
  the format and its PyTorch quantize/dequantize (fp8's scales and key shifts come from
  `fp8_calibration`, default scale 1.0, no shift);
- a **row pool** (kvlab/cache/rows.py): int4 and int2 keep their residual window, the blocks not
  yet quantized, in full-precision rows (opened by `begin_step`, a block sealed by the write that
  fills it, its row still read by that step's attention and given back after the step's last
  layer); `keep_sink_token=True` keeps each sequence's first token in a sink row, read in place of
  its quantized copy.

Both attention backends store the same bytes; they differ in who computes them:

- "triton": the fused path. The write kernel (reshape_and_cache, int4 and int2: reshape_and_cache_int4)
  quantizes the new rows on the way in, and the decode / prefill kernels of
  kvlab.attention.paged_triton read the codes and scales directly, dequantizing tile by tile in
  registers. Nothing is dequantized in PyTorch.
- "torch": the reference, the slow twin of the same bytes. `write` quantizes with kvlab.quant's
  PyTorch functions; `dequantize_blocks` turns the blocks this step's block tables name into a
  small temporary float pool (block ids remapped), and paged_torch's attention runs on it.

The kernels are bit-identical to the PyTorch quantizers (tests/test_kernels_cache.py,
tests/test_kernels_int4.py), so after the same steps the two backends hold the same bytes and
their attention outputs differ only by float rounding (tests/test_kernels_quant_engine.py).
"""
from __future__ import annotations

import math

import torch

from kvlab.attention import backend_module
from kvlab.cache.block_codecs import make_codec
from kvlab.cache.paged import step_metadata
from kvlab.cache.rows import RowPool
from kvlab.quant import bytes_per_block_per_head
from kvlab.quant.common import check_kv_cache_dtype


def _codec_storage(name: str, doc: str):
    return property(lambda self: getattr(self.codec, name), doc=doc)


class QuantizedPagedKVCache:
    """QuantizedPagedKVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim,
    dtype=torch.float32, device="cpu", attention_backend="torch", kv_cache_dtype="int8",
    fp8_calibration=None, keep_sink_token=False, residual_rows=None, sink_rows=None)

    `dtype` is the model's: what reads return and what the full-precision rows are kept in.
    `fp8_calibration`: an optional `kvlab.quant.fp8.Fp8Calibration` (scales per layer, and key
    shifts: keys are stored minus their shift, and attention reads them as stored, since a shift
    common to all keys does not change softmax; the PyTorch reference adds it back on read).
    `keep_sink_token`: each sequence's position-0 token also kept unquantized (kvlab.quant.sink).
    `residual_rows`, `sink_rows`: preallocate that many rows, fixed (the engine does, inside its
    KV budget: kvlab/engine/kv_budget.py); None: a small pool that grows and shrinks as needed.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device="cpu",
                 attention_backend: str = "torch", kv_cache_dtype: str = "int8", fp8_calibration=None,
                 keep_sink_token: bool = False, residual_rows: int | None = None,
                 sink_rows: int | None = None):
        check_kv_cache_dtype(kv_cache_dtype)
        if kv_cache_dtype == "auto":
            raise ValueError("kv_cache_dtype='auto' is the full-precision kvlab.cache.paged.PagedKVCache")
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                            ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if value <= 0:
                raise ValueError(f"QuantizedPagedKVCache: {name} must be positive, got {value}")
        if not isinstance(keep_sink_token, bool):
            raise ValueError(f"keep_sink_token must be True or False, got {keep_sink_token!r}")
        self.codec = make_codec(kv_cache_dtype, num_layers, num_blocks, block_size, num_kv_heads,
                                head_dim, device, fp8_calibration)
        if keep_sink_token and self.codec.seals_blocks and block_size < 2:
            raise ValueError(f"keep_sink_token with {kv_cache_dtype} needs block_size >= 2 (the first "
                             f"block's key scales come from its other tokens), got {block_size}")
        self.rows = RowPool(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device,
                            residual=self.codec.seals_blocks, sinks=keep_sink_token,
                            residual_rows=residual_rows, sink_rows=sink_rows)
        self.kv_cache_dtype = kv_cache_dtype
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.attention_backend = attention_backend
        self.ops = backend_module(attention_backend)
        self.fused = attention_backend == "triton"
        self.scale = 1.0 / math.sqrt(head_dim)
        self.metadata, self._closed = None, True
        self.compactor = None      # a KV budget's KVCompactor (kvlab.LLM sets it), else None

    # the codec's storage, per layer (what the kernels read; tests compare it across backends)
    k_cache = _codec_storage("k_cache", "codes of the keys, one [NB, BS, Hkv, ...] tensor per layer")
    v_cache = _codec_storage("v_cache", "codes of the values, per layer")
    k_scale = _codec_storage("k_scale", "key scales, per layer (layout: docs/architecture.md section 4)")
    v_scale = _codec_storage("v_scale", "value scales, per layer")
    k_zero = _codec_storage("k_zero", "int4/int2: key zero points, per layer")
    v_zero = _codec_storage("v_zero", "int4/int2: value zero points, per layer")
    k_shift = _codec_storage("k_shift", "fp8: the key shift [Hkv, D] per layer, or None")

    @property
    def residual(self):
        """int4/int2: the residual pool (kvlab.quant.residual.Int4Residual) of the row pool."""
        return self.rows.residual

    @residual.setter
    def residual(self, pool) -> None:
        self.rows.residual = pool

    @property
    def sinks(self):
        """keep_sink_token: the sink pool of the row pool, else None."""
        return self.rows.sinks

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype = torch.float32, kv_cache_dtype: str = "int8") -> int:
        """Bytes of one block id across all layers, K and V, codes and scales (kvlab.quant)."""
        return num_layers * num_kv_heads * bytes_per_block_per_head(head_dim, kv_cache_dtype,
                                                                    block_size, dtype)

    @staticmethod
    def fixed_bytes(num_layers: int, num_kv_heads: int, head_dim: int, kv_cache_dtype: str) -> int:
        """Bytes that do not scale with the pool: fp8's per-layer scales and key shifts (an upper
        bound: scales per head, a shift per channel, float32)."""
        if kv_cache_dtype != "fp8":
            return 0
        return num_layers * 4 * (2 * num_kv_heads + num_kv_heads * head_dim)

    @property
    def num_residual_blocks(self) -> int:
        """int4, int2: full-precision blocks (residual rows) currently held (0 for the other formats)."""
        return self.rows.residual_rows_in_use

    @property
    def residual_bytes(self) -> int:
        """int4, int2: bytes of the full-precision residual pool now."""
        return self.rows.residual_bytes

    @property
    def sink_bytes(self) -> int:
        """keep_sink_token: bytes of the full-precision sink rows now."""
        return self.rows.sink_bytes

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this cache holds: codes, scales, zeros, key shifts, rows."""
        scores = self.compactor.nbytes if self.compactor is not None else 0
        return self.codec.nbytes + self.rows.nbytes + scores

    # ---- a per-sequence KV budget (kvlab/cache/compaction.py): per-token formats only ---------
    def slot_views(self, layer: int) -> list[torch.Tensor]:
        """The layer's per-slot tensors (codes, and scales kept per token), [NB * BS, Hkv, ...]."""
        lead = (self.num_blocks, self.block_size, self.num_kv_heads)
        found = [getattr(self.codec, name)[layer] for name in ("k_cache", "v_cache", "k_scale", "v_scale")
                 if getattr(self.codec, name, None) is not None]
        return [t.view(-1, *t.shape[2:]) for t in found if tuple(t.shape[:3]) == lead]

    def context_keys(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """Dequantized keys of the given blocks, in order, [len(blocks) * block_size, Hkv, D]."""
        return self.dequantize_blocks(layer, blocks)[0].flatten(0, 1)

    # ---- the step -------------------------------------------------------------------------------
    def discard_blocks(self, block_ids) -> None:
        """The block manager dropped these blocks' contents: their rows, if any, go back."""
        self.rows.discard(block_ids)

    def begin_step(self, metadata, freed_blocks=()) -> None:
        """Called by the engine's runner before each forward pass: first the blocks dropped since
        the last step give their rows back (one of them may be written again this step), then the
        step's residual and sink rows open (kvlab/cache/rows.py)."""
        self.rows.begin_step(metadata, freed_blocks)
        if metadata is not None and metadata.compactions:
            self.compactor.compact(self, metadata.compactions)
        self.metadata, self._closed = metadata, False

    def advance(self, num_tokens: int) -> None:
        """The model's forward ended (kvlab/cache/base.py): the blocks the step sealed give their
        residual rows back, this step's attention has read them (positions live in the metadata)."""
        if self.metadata is not None and not self._closed:
            self.rows.close(self.metadata.slot_mapping)
        self._closed = True

    def end_step(self) -> None:
        """Called by the runner after each forward pass, also when it raised: rows close as in
        `advance` if the forward did not get there, and the step's metadata is dropped."""
        self.advance(0)
        self.metadata = None

    def set_metadata(self, metadata) -> None:
        """begin_step(metadata) without freed blocks (tests driving the cache by hand end the step
        with end_step())."""
        self.begin_step(metadata)

    def kernel_args(self, layer: int) -> dict:
        """The quantization and row keyword arguments of kvlab.attention.paged_triton for one layer."""
        return self.codec.kernel_args(layer) | self.rows.kernel_args(layer)

    # ---- the PyTorch reference: write and read ------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Quantize k, v [N, Hkv, D] into `slots` with kvlab.quant (what the write kernels do):
        per-token codecs at once; KIVI's tokens into their residual rows, then every block this
        write filled is encoded from its row. Sinks are also stored in their rows."""
        keep = slots >= 0
        k, v, slots = self.codec.store_keys(layer, k[keep]), v[keep], slots[keep]
        if self.codec.seals_blocks:
            blocks = self.rows.write_residual(layer, k, v, slots)
            kb, vb = self.rows.residual_blocks(layer, blocks)
            BS = self.block_size
            block_slots = (blocks[:, None] * BS + torch.arange(BS, device=blocks.device)).flatten()
            self.codec.encode(layer, kb.flatten(0, 1), vb.flatten(0, 1), block_slots,
                              skip_first=self.rows.has_sink(blocks))
        else:
            self.codec.encode(layer, k, v, slots)
        self.rows.write_sinks(layer, k, v, slots)

    def dequantize_blocks(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision K and V [len(blocks), BS, Hkv, D] of the given block ids (model dtype);
        blocks that still hold a residual row are read from it, and the offset-0 token of a block
        with a sink row from that row."""
        b = blocks.long()
        k, v = self.codec.decode(layer, b, self.dtype)
        return self.rows.overlay(layer, b, k, v, self.codec.load_keys)

    def _attend_reference(self, layer: int, q, k, v, m) -> torch.Tensor:
        self.write(layer, k, v, m.slot_mapping)
        tables = m.block_tables
        used = tables[tables >= 0].unique()
        kd, vd = self.dequantize_blocks(layer, used)          # [U, BS, Hkv, D]
        remap = torch.full((self.num_blocks,), -1, dtype=tables.dtype, device=tables.device)
        remap[used.long()] = torch.arange(used.numel(), dtype=tables.dtype, device=tables.device)
        local = torch.where(tables >= 0, remap[tables.clamp(min=0).long()], tables)
        if m.is_decode:
            return self.ops.paged_decode_attention(q, kd, vd, local, m.context_lens, self.scale)
        return self.ops.paged_prefill_attention(q, kd, vd, local, m.query_start_loc,
                                                m.context_lens, self.scale)

    # ---- the fused path: the Triton kernels read the quantized blocks -------------------------
    def _attend_fused(self, layer: int, q, k, v, m) -> torch.Tensor:
        kc, vc, a = self.k_cache[layer], self.v_cache[layer], self.kernel_args(layer)
        k = self.codec.store_keys(layer, k)  # fp8 key smoothing: stored minus the shift, read as stored
        # KIVI: begin_step gave every written block a row, so the write's host-side check of the
        # slots (a device sync per layer) is not needed
        self.ops.reshape_and_cache(k, v, kc, vc, m.slot_mapping, **a, check_slots=not self.codec.seals_blocks)
        if m.is_decode:
            return self.ops.paged_decode_attention(q, kc, vc, m.block_tables, m.context_lens,
                                                   self.scale, **a)
        return self.ops.paged_prefill_attention(q, kc, vc, m.block_tables, m.query_start_loc,
                                                m.context_lens, self.scale, **a)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, N, Hq, D], k and v [1, N, Hkv, D] (packed batch) -> [1, N, Hq, D]."""
        m = step_metadata(self, q)
        attend = self._attend_fused if self.fused else self._attend_reference
        out = attend(layer, q[0], k[0], v[0], m)
        if self.compactor is not None:
            self.compactor.observe(self, layer, q[0], m)
        return out.unsqueeze(0)
