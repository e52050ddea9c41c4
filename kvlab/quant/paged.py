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

fp8's scales and key shifts come from `fp8_calibration` (default: scale 1.0, no shift).
`keep_sink_token=True` also keeps each sequence's first token in full precision in a small pool of
rows (kvlab.quant.sink), read in place of its quantized copy.
int4 and int2 also keep their residual window, the blocks not yet quantized, in full precision in a pool of
rows (`kvlab.quant.residual.Int4Residual`): opened by `set_metadata` before a step, a block sealed
(quantized) by the write that fills it, its row still read by that step's attention and given back
after the step's last layer.

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
from kvlab.cache.paged import step_metadata
from kvlab.quant import bytes_per_block_per_head, fp8, int4, int8
from kvlab.quant.common import check_kv_cache_dtype
from kvlab.quant.residual import Int4Residual, sealed_blocks
from kvlab.quant.sink import create_sink_pool, sink_args, sink_blocks


class QuantizedPagedKVCache:
    """QuantizedPagedKVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim,
    dtype=torch.float32, device="cpu", attention_backend="torch", kv_cache_dtype="int8",
    fp8_calibration=None, keep_sink_token=False)

    `dtype` is the model's: what reads return and what int4's residual window is kept in.
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
        self.bits = int4.FORMAT_BITS.get(kv_cache_dtype)     # 4 or 2 for the KIVI formats, else None
        if self.bits:
            int4.value_group(head_dim, self.bits)  # raises for a head_dim it cannot group or pack
        if fp8_calibration is not None and kv_cache_dtype != "fp8":
            raise ValueError(f"fp8_calibration is only for kv_cache_dtype='fp8', not {kv_cache_dtype!r}")
        if not isinstance(keep_sink_token, bool):
            raise ValueError(f"keep_sink_token must be True or False, got {keep_sink_token!r}")
        if keep_sink_token and self.bits and block_size < 2:
            raise ValueError(f"keep_sink_token with {kv_cache_dtype} needs block_size >= 2 (the first "
                             f"block's key scales come from its other tokens), got {block_size}")
        self.kv_cache_dtype = kv_cache_dtype
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.attention_backend = attention_backend
        self.ops = backend_module(attention_backend)
        self.fused = attention_backend == "triton"
        self.scale = 1.0 / math.sqrt(head_dim)
        self.metadata, self._closed = None, True
        NB, BS, H, D, dev = num_blocks, block_size, num_kv_heads, head_dim, self.device

        def zeros(*shape, dt):
            return [torch.zeros(shape, dtype=dt, device=dev) for _ in range(num_layers)]

        f16 = torch.float16
        if kv_cache_dtype == "int8":
            self.k_cache, self.v_cache = (zeros(NB, BS, H, D, dt=torch.int8) for _ in "kv")
            self.k_scale, self.v_scale = (zeros(NB, BS, H, dt=f16) for _ in "kv")
        elif kv_cache_dtype == "fp8":
            self.k_cache, self.v_cache = (zeros(NB, BS, H, D, dt=fp8.FP8) for _ in "kv")
            cal = fp8_calibration or fp8.Fp8Calibration([1.0] * num_layers, [1.0] * num_layers)
            cal = cal.check(num_layers, num_kv_heads, head_dim)
            self.k_scale, self.v_scale = ([x.to(dev) for x in xs] for xs in (cal.k_scales, cal.v_scales))
            self.k_shift = None if cal.k_shift is None else [x.to(dev) for x in cal.k_shift]
        else:  # int4, int2
            G = D // int4.value_group(D, self.bits)
            self.k_cache, self.v_cache = (zeros(NB, BS, H, D * self.bits // 8, dt=torch.uint8) for _ in "kv")
            self.k_scale, self.k_zero = (zeros(NB, H, D, dt=f16) for _ in "sz")
            self.v_scale, self.v_zero = (zeros(NB, BS, H, G, dt=f16) for _ in "sz")
            self.residual = Int4Residual.create(num_layers, NB, BS, H, D, dtype, dev, residual_rows or 16,
                                                fixed=residual_rows is not None)
        self.sinks = create_sink_pool(num_layers, NB, H, D, dtype, dev, sink_rows or 16,
                                      fixed=sink_rows is not None) if keep_sink_token else None

    def _k_shift(self, layer: int):
        """fp8 key smoothing: the shift [Hkv, D] of `layer`, or None."""
        return self.k_shift[layer] if self.kv_cache_dtype == "fp8" and self.k_shift is not None else None

    def _smooth(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """Keys minus the layer's shift, in float32 then back to k's dtype (the same on both paths)."""
        shift = self._k_shift(layer)
        return k if shift is None else (k.float() - shift).to(k.dtype)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype = torch.float32, kv_cache_dtype: str = "int8") -> int:
        """Bytes of one block id across all layers, K and V, codes and scales (kvlab.quant)."""
        return num_layers * num_kv_heads * bytes_per_block_per_head(head_dim, kv_cache_dtype,
                                                                    block_size, dtype)

    @property
    def num_residual_blocks(self) -> int:
        """int4, int2: full-precision blocks (residual rows) currently held (0 for the other formats)."""
        return self.residual.rows_in_use if self.bits else 0

    @property
    def residual_bytes(self) -> int:
        """int4, int2: bytes of the full-precision residual pool now."""
        return self.residual.nbytes if self.bits else 0

    @property
    def sink_bytes(self) -> int:
        """keep_sink_token: bytes of the full-precision sink rows now."""
        return self.sinks.nbytes if self.sinks is not None else 0

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this cache holds: codes, scales, zeros, key shifts, rows."""
        ts = [*self.k_cache, *self.v_cache, *self.k_scale, *self.v_scale]
        if self.bits:
            ts += [*self.k_zero, *self.v_zero]
        if self.kv_cache_dtype == "fp8" and self.k_shift is not None:
            ts += list(self.k_shift)
        return sum(t.numel() * t.element_size() for t in ts) + self.residual_bytes + self.sink_bytes

    @staticmethod
    def fixed_bytes(num_layers: int, num_kv_heads: int, head_dim: int, kv_cache_dtype: str) -> int:
        """Bytes that do not scale with the pool: fp8's per-layer scales and key shifts (an upper
        bound: scales per head, a shift per channel, float32)."""
        if kv_cache_dtype != "fp8":
            return 0
        return num_layers * 4 * (2 * num_kv_heads + num_kv_heads * head_dim)

    def discard_blocks(self, block_ids) -> None:
        """The block manager dropped these blocks' contents: int4's residual rows and the blocks'
        sink rows, if any, go back (nothing else is kept per block outside the pool)."""
        block_ids = list(block_ids)
        if self.bits:
            self.residual.discard(block_ids)
        if self.sinks is not None:
            self.sinks.discard(block_ids)

    def discard_block(self, block_id: int) -> None:
        self.discard_blocks([block_id])

    def begin_step(self, metadata, freed_blocks=()) -> None:
        """Called by the engine's runner before each forward pass: first the blocks dropped since
        the last step give their rows back (one of them may be written again this step), then
        int4 opens this step's residual rows, and the first blocks whose position 0 this step
        writes get their sink rows."""
        self.discard_blocks(freed_blocks)
        self.metadata, self._closed = metadata, False
        if metadata is not None and self.bits:
            self.residual.open(metadata.slot_mapping)
        if metadata is not None and self.sinks is not None:
            self.sinks.assign(sink_blocks(metadata.block_tables, metadata.slot_mapping, self.block_size))

    def advance(self, num_tokens: int) -> None:
        """The model's forward ended (kvlab/cache/base.py): the blocks the step sealed give their
        residual rows back, this step's attention has read them (positions live in the metadata)."""
        if self.metadata is not None and self.bits and not self._closed:
            self.residual.close(self.metadata.slot_mapping)
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
        """The quantization keyword arguments of kvlab.attention.paged_triton for one layer."""
        a = dict(k_scale=self.k_scale[layer], v_scale=self.v_scale[layer])
        if self.bits:
            a.update(k_zero=self.k_zero[layer], v_zero=self.v_zero[layer], **self.residual.args(layer))
        if self.sinks is not None:
            a.update(sink_args(self.sinks, layer))
        return a

    # ---- the PyTorch reference: write and read ------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Quantize k, v [N, Hkv, D] into `slots` with kvlab.quant (what the write kernels do)."""
        keep = slots >= 0
        k, v, slots = k[keep], v[keep], slots[keep]
        NB, BS, H, D = self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim
        if self.kv_cache_dtype == "int8":
            for x, codes, scales in ((k, self.k_cache, self.k_scale), (v, self.v_cache, self.v_scale)):
                q, s = int8.quantize_int8(x)
                codes[layer].view(NB * BS, H, D).index_copy_(0, slots, q)
                scales[layer].view(NB * BS, H).index_copy_(0, slots, s)
        elif self.kv_cache_dtype == "fp8":
            for x, codes, scale in ((self._smooth(layer, k), self.k_cache, self.k_scale),
                                    (v, self.v_cache, self.v_scale)):
                q = fp8.quantize_fp8(x, scale[layer]).view(torch.uint8)  # CPU index_copy_ lacks fp8
                codes[layer].view(torch.uint8).view(NB * BS, H, D).index_copy_(0, slots, q)
        else:  # int4, int2: rows into the residual pool, then seal the blocks this write filled
            res = self.residual
            rows = res.res_slot[slots // BS].long()
            if bool((rows < 0).any()):
                raise RuntimeError("int4 write to a block without a residual row: call set_metadata "
                                   "with this step's slot mapping first")
            flat = rows * BS + slots % BS
            for x, pool in ((k, res.k_res[layer]), (v, res.v_res[layer])):
                pool.view(-1, H, D).index_copy_(0, flat, x.to(pool.dtype))
            for b in sealed_blocks(slots, BS).tolist():
                r = int(res.res_slot[b])
                sink = self.sinks is not None and int(self.sinks.res_slot[b]) >= 0
                (self.k_cache[layer][b], self.k_scale[layer][b],
                 self.k_zero[layer][b]) = int4.quantize_keys(res.k_res[layer][r], self.bits, skip_first=sink)
                (self.v_cache[layer][b], self.v_scale[layer][b],
                 self.v_zero[layer][b]) = int4.quantize_values(res.v_res[layer][r], bits=self.bits)
        if self.sinks is None:
            return
        rows = self.sinks.res_slot[slots // BS].long()
        hit = (slots % BS == 0) & (rows >= 0)    # position 0 of a sequence: also kept unquantized
        if bool(hit.any()):
            for x, pool in ((self._smooth(layer, k), self.sinks.k_res[layer]), (v, self.sinks.v_res[layer])):
                pool[rows[hit], 0] = x[hit].to(pool.dtype)

    def dequantize_blocks(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision K and V [len(blocks), BS, Hkv, D] of the given block ids (model dtype);
        int4 blocks that still hold a residual row are read from it, and the offset-0 token of a
        block with a sink row from that row."""
        k, v = self._dequantize(layer, blocks.long())
        if self.sinks is None:
            return k, v
        rows = self.sinks.res_slot[blocks.long()].long()
        hot = rows >= 0
        if bool(hot.any()):
            sk = self.sinks.k_res[layer][rows[hot], 0]
            shift = self._k_shift(layer)      # stored minus the shift, like every fp8 key
            k[hot, 0] = (sk if shift is None else sk.float() + shift).to(k.dtype)
            v[hot, 0] = self.sinks.v_res[layer][rows[hot], 0].to(v.dtype)
        return k, v

    def _dequantize(self, layer: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dt = self.dtype
        if self.kv_cache_dtype == "int8":
            return (int8.dequantize_int8(self.k_cache[layer][b], self.k_scale[layer][b], dt),
                    int8.dequantize_int8(self.v_cache[layer][b], self.v_scale[layer][b], dt))
        if self.kv_cache_dtype == "fp8":
            return (fp8.dequantize_fp8(self.k_cache[layer][b], self.k_scale[layer], dt,
                                       self._k_shift(layer)),
                    fp8.dequantize_fp8(self.v_cache[layer][b], self.v_scale[layer], dt))
        k = int4.dequantize_keys(self.k_cache[layer][b], self.k_scale[layer][b], self.k_zero[layer][b], dt,
                                 self.bits)
        v = int4.dequantize_values(self.v_cache[layer][b], self.v_scale[layer][b], self.v_zero[layer][b], dt,
                                   self.bits)
        rows = self.residual.res_slot[b].long()
        hot = rows >= 0
        if bool(hot.any()):  # partial blocks, and blocks sealed this step: the residual window
            k[hot] = self.residual.k_res[layer][rows[hot]].to(dt)
            v[hot] = self.residual.v_res[layer][rows[hot]].to(dt)
        return k, v

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
        # int4, int2: set_metadata gave every written block a row, so the write's host-side check
        # of the slots (a device sync per layer) is not needed
        unchecked = dict(check_slots=False) if self.bits else {}
        k = self._smooth(layer, k)  # fp8 key smoothing: stored minus the shift, read as stored
        self.ops.reshape_and_cache(k, v, kc, vc, m.slot_mapping, **a, **unchecked)
        if m.is_decode:
            return self.ops.paged_decode_attention(q, kc, vc, m.block_tables, m.context_lens,
                                                   self.scale, **a)
        return self.ops.paged_prefill_attention(q, kc, vc, m.block_tables, m.query_start_loc,
                                                m.context_lens, self.scale, **a)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, N, Hq, D], k and v [1, N, Hkv, D] (packed batch) -> [1, N, Hq, D]."""
        m = step_metadata(self, q)
        attend = self._attend_fused if self.fused else self._attend_reference
        return attend(layer, q[0], k[0], v[0], m).unsqueeze(0)

