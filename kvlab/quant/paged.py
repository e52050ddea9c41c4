"""The paged KV cache with quantized blocks: quantize on write, dequantize on read.

Same contract as `kvlab.cache.paged.PagedKVCache` (docs/architecture.md sections 3 and 4): the
engine constructs it with the same arguments plus `kv_cache_dtype`, sizes its pool with
`bytes_per_block`, and sets an `AttentionMetadata` before every forward. Per layer it keeps codes
and scales next to each other, block-indexed like the full-precision pool:

| kv_cache_dtype | codes (K and V each) | scales |
|---|---|---|
| int8 | int8 `[NB, BS, Hkv, D]` | float16 `[NB, BS, Hkv]` |
| fp8  | float8_e4m3fn `[NB, BS, Hkv, D]` | float32 per layer, `[]` or `[Hkv]` (`fp8_scales`, default 1.0) |
| int4 | uint8 `[NB, BS, Hkv, D/2]` | keys float16 scale, zero `[NB, Hkv, D]`; values `[NB, BS, Hkv, D/32]` |

Reading dequantizes the blocks this step's block tables name (into a small temporary pool, block
ids remapped), then runs the backend's paged attention on them, the same reference as the
full-precision cache. A fused kernel would dequantize inside the attention loop instead; the
numbers it must reproduce are these.

int4 (KIVI) keeps each sequence's last, partial block in full precision (the residual window) in a
side table `residual[layer][block_id]`; a block is quantized when its last slot is written, *after*
this step's attention, so the queries of a prefill attend over their own block in full precision
as in KIVI, and a decode step sees exactly what `kvlab.quant.sim.FakeQuantKVCache` shows it. A
residual entry is dropped when its block fills or when slot 0 of its block is written again (a
freed block reused); at most one entry per block id exists, see `num_residual_blocks`.
"""
from __future__ import annotations

import math

import torch

from kvlab.attention import backend_module
from kvlab.quant import bytes_per_block_per_head, fp8, int4, int8
from kvlab.quant.common import check_kv_cache_dtype


class QuantizedPagedKVCache:
    """QuantizedPagedKVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim,
    dtype=torch.float32, device="cpu", attention_backend="torch", kv_cache_dtype="int8",
    fp8_scales=None)

    `dtype` is the model's: what reads return and what int4's residual window is kept in.
    `fp8_scales`: optional (k_scales, v_scales), one `[]` or `[Hkv]` tensor per layer.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device="cpu",
                 attention_backend: str = "torch", kv_cache_dtype: str = "int8", fp8_scales=None):
        check_kv_cache_dtype(kv_cache_dtype)
        if kv_cache_dtype == "auto":
            raise ValueError("kv_cache_dtype='auto' is the full-precision kvlab.cache.paged.PagedKVCache")
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                            ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if value <= 0:
                raise ValueError(f"QuantizedPagedKVCache: {name} must be positive, got {value}")
        if kv_cache_dtype == "int4":
            int4.value_group(head_dim)  # raises for a head_dim int4 cannot group
        self.kv_cache_dtype = kv_cache_dtype
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.ops = backend_module(attention_backend)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.metadata = None
        NB, BS, H, D, dev = num_blocks, block_size, num_kv_heads, head_dim, self.device

        def zeros(*shape, dt):
            return [torch.zeros(shape, dtype=dt, device=dev) for _ in range(num_layers)]

        f16 = torch.float16
        if kv_cache_dtype == "int8":
            self.k_cache, self.v_cache = (zeros(NB, BS, H, D, dt=torch.int8) for _ in "kv")
            self.k_scale, self.v_scale = (zeros(NB, BS, H, dt=f16) for _ in "kv")
        elif kv_cache_dtype == "fp8":
            self.k_cache, self.v_cache = (zeros(NB, BS, H, D, dt=fp8.FP8) for _ in "kv")
            ks, vs = fp8_scales if fp8_scales is not None else ([1.0] * num_layers, [1.0] * num_layers)
            self.k_scale = [torch.as_tensor(s, dtype=torch.float32, device=dev) for s in ks]
            self.v_scale = [torch.as_tensor(s, dtype=torch.float32, device=dev) for s in vs]
        else:  # int4
            G = D // int4.value_group(D)
            self.k_cache, self.v_cache = (zeros(NB, BS, H, D // 2, dt=torch.uint8) for _ in "kv")
            self.k_scale, self.k_zero = (zeros(NB, H, D, dt=f16) for _ in "sz")
            self.v_scale, self.v_zero = (zeros(NB, BS, H, G, dt=f16) for _ in "sz")
            # block id -> (k, v) [BS, Hkv, D] in the model dtype, per layer
            self.residual: list[dict[int, tuple]] = [{} for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype = torch.float32, kv_cache_dtype: str = "int8") -> int:
        """Bytes of one block id across all layers, K and V, codes and scales (kvlab.quant)."""
        return num_layers * num_kv_heads * bytes_per_block_per_head(head_dim, kv_cache_dtype,
                                                                    block_size, dtype)

    @property
    def num_residual_blocks(self) -> int:
        """int4: full-precision partial blocks currently held (0 for the other formats)."""
        return len(self.residual[0]) if self.kv_cache_dtype == "int4" else 0

    def set_metadata(self, metadata) -> None:
        self.metadata = metadata

    # ---- write ------------------------------------------------------------------------------
    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> list[int]:
        """Quantize k, v [N, Hkv, D] into `slots`; int4 returns the blocks that filled."""
        keep = slots >= 0
        k, v, slots = k[keep], v[keep], slots[keep]
        NB, BS, H, D = self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim
        if self.kv_cache_dtype == "int8":
            for x, codes, scales in ((k, self.k_cache, self.k_scale), (v, self.v_cache, self.v_scale)):
                q, s = int8.quantize_int8(x)
                codes[layer].view(NB * BS, H, D).index_copy_(0, slots, q)
                scales[layer].view(NB * BS, H).index_copy_(0, slots, s)
            return []
        if self.kv_cache_dtype == "fp8":
            for x, codes, scale in ((k, self.k_cache, self.k_scale), (v, self.v_cache, self.v_scale)):
                q = fp8.quantize_fp8(x, scale[layer]).view(torch.uint8)  # CPU index_copy_ lacks fp8
                codes[layer].view(torch.uint8).view(NB * BS, H, D).index_copy_(0, slots, q)
            return []
        full, res = [], self.residual[layer]
        blocks, offsets = (slots // BS).tolist(), (slots % BS).tolist()
        for i, (b, o) in enumerate(zip(blocks, offsets)):
            if o == 0 or b not in res:  # a block starts (or is reused): fresh residual buffers
                res[b] = (torch.zeros(BS, H, D, dtype=self.dtype, device=self.device),
                          torch.zeros(BS, H, D, dtype=self.dtype, device=self.device))
            res[b][0][o], res[b][1][o] = k[i], v[i]
            if o == BS - 1:
                full.append(b)
        return full

    def _seal_int4(self, layer: int, blocks: list[int]) -> None:
        """Quantize filled blocks: keys per channel over the block's tokens, values per token."""
        res = self.residual[layer]
        for b in blocks:
            kb, vb = res.pop(b)
            self.k_cache[layer][b], self.k_scale[layer][b], self.k_zero[layer][b] = int4.quantize_keys(kb)
            self.v_cache[layer][b], self.v_scale[layer][b], self.v_zero[layer][b] = int4.quantize_values(vb)

    # ---- read -------------------------------------------------------------------------------
    def dequantize_blocks(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision K and V [len(blocks), BS, Hkv, D] of the given block ids (model dtype)."""
        b, dt = blocks.long(), self.dtype
        if self.kv_cache_dtype == "int8":
            return (int8.dequantize_int8(self.k_cache[layer][b], self.k_scale[layer][b], dt),
                    int8.dequantize_int8(self.v_cache[layer][b], self.v_scale[layer][b], dt))
        if self.kv_cache_dtype == "fp8":
            return (fp8.dequantize_fp8(self.k_cache[layer][b], self.k_scale[layer], dt),
                    fp8.dequantize_fp8(self.v_cache[layer][b], self.v_scale[layer], dt))
        k = int4.dequantize_keys(self.k_cache[layer][b], self.k_scale[layer][b], self.k_zero[layer][b], dt)
        v = int4.dequantize_values(self.v_cache[layer][b], self.v_scale[layer][b], self.v_zero[layer][b], dt)
        res = self.residual[layer]
        for i, bid in enumerate(blocks.tolist()):
            if bid in res:  # the partial block: read its full-precision residual window
                k[i], v[i] = res[bid]
        return k, v

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, N, Hq, D], k and v [1, N, Hkv, D] (packed batch) -> [1, N, Hq, D]."""
        m = self.metadata
        if m is None:
            raise RuntimeError("QuantizedPagedKVCache.attend called before set_metadata()")
        if q.shape[0] != 1:
            raise ValueError(f"the paged cache runs packed batches (B = 1), got B = {q.shape[0]}")
        filled = self._write(layer, k[0], v[0], m.slot_mapping)
        tables = m.block_tables
        used = tables[tables >= 0].unique()
        kd, vd = self.dequantize_blocks(layer, used)          # [U, BS, Hkv, D]
        remap = torch.full((self.num_blocks,), -1, dtype=tables.dtype, device=tables.device)
        remap[used.long()] = torch.arange(used.numel(), dtype=tables.dtype, device=tables.device)
        local = torch.where(tables >= 0, remap[tables.clamp(min=0).long()], tables)
        if m.is_decode:
            out = self.ops.paged_decode_attention(q[0], kd, vd, local, m.context_lens, self.scale)
        else:
            out = self.ops.paged_prefill_attention(q[0], kd, vd, local, m.query_start_loc,
                                                   m.context_lens, self.scale)
        if filled:
            self._seal_int4(layer, filled)
        return out.unsqueeze(0)

    def advance(self, num_tokens: int) -> None:
        """Nothing to move: positions live in the metadata, which the engine replaces each step."""
