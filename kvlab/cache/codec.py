"""A paged KV cache for any storage format given as a codec: the KV-format seam of the engine.

`kvlab.LLM(kv_cache_dtype=codec)` runs the real engine with a format written elsewhere (a
student's, in the course): `codec` follows `kvlab.engine.protocols.KVFormat`, three methods,

    storage(num_blocks, block_size, num_kv_heads, head_dim, device) -> {name: tensor [num_blocks, ...]}
    write(store, k, v, slots)          # encode k, v [N, Hkv, D] into the flat slots
    read(store, blocks, dtype) -> (k, v)   # decode whole blocks -> [len(blocks), BS, Hkv, D] each

and `CodecPagedKVCache` does the rest, the way the PyTorch reference of the built-in formats does
(kvlab/quant/paged.py): each layer writes the new tokens through the codec, decodes the blocks
this step's block tables name into a small temporary pool (block ids remapped), and runs the
attention backend's paged attention on it. The pool is sized by the bytes `storage` allocates
for one block (`bytes_per_block`), so a denser format holds more tokens in the same budget.

`Int8PerToken` is the smallest real example: one float16 scale per token and head, the scheme
of kvlab.quant.int8, so it must produce exactly what `kv_cache_dtype="int8"` does on the torch
backend (tests/test_engine_seams.py checks it).
"""
from __future__ import annotations

import math

import torch

from kvlab.attention import backend_module
from kvlab.cache.paged import step_metadata
from kvlab.engine.protocols import KV_FORMAT_METHODS, check_protocol


class Int8PerToken:
    """int8 codes and a float16 scale per token and head (kvlab.quant.int8) as a KVFormat."""

    def storage(self, num_blocks, block_size, num_kv_heads, head_dim, device):
        shape = (num_blocks, block_size, num_kv_heads)
        return {name: torch.zeros(*shape, head_dim, dtype=torch.int8, device=device) for name in ("k", "v")} | \
               {name: torch.zeros(*shape, dtype=torch.float16, device=device) for name in ("ks", "vs")}

    def write(self, store, k, v, slots):
        from kvlab.quant.int8 import quantize_int8

        for x, codes, scales in ((k, "k", "ks"), (v, "v", "vs")):
            q, s = quantize_int8(x)
            store[codes].view(-1, *q.shape[1:]).index_copy_(0, slots, q)
            store[scales].view(-1, *s.shape[1:]).index_copy_(0, slots, s)

    def read(self, store, blocks, dtype):
        from kvlab.quant.int8 import dequantize_int8

        return (dequantize_int8(store["k"][blocks], store["ks"][blocks], dtype),
                dequantize_int8(store["v"][blocks], store["vs"][blocks], dtype))


def _nbytes(store: dict) -> int:
    return sum(t.numel() * t.element_size() for t in store.values())


class CodecPagedKVCache:
    """CodecPagedKVCache(codec, num_layers, num_blocks, block_size, num_kv_heads, head_dim,
    dtype=torch.float32, device="cpu", attention_backend="torch")"""

    def __init__(self, codec, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device="cpu",
                 attention_backend="torch"):
        check_protocol(codec, KV_FORMAT_METHODS, "KV format", "kv_cache_dtype")
        self.codec = codec
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.ops = backend_module(attention_backend)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.metadata = None
        self.stores = [codec.storage(num_blocks, block_size, num_kv_heads, head_dim, self.device)
                       for _ in range(num_layers)]
        for name, t in self.stores[0].items():
            if t.shape[0] != num_blocks:
                raise ValueError(f"kv_cache_dtype: storage {name!r} must have a leading block "
                                 f"dimension of {num_blocks}, got shape {tuple(t.shape)}")

    @staticmethod
    def bytes_per_block(codec, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes one block costs across all layers: what the codec's storage holds per block."""
        check_protocol(codec, KV_FORMAT_METHODS, "KV format", "kv_cache_dtype")
        return num_layers * _nbytes(codec.storage(1, block_size, num_kv_heads, head_dim, "meta"))

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(s) for s in self.stores)

    def begin_step(self, metadata, freed_blocks=()) -> None:
        self.metadata = metadata

    def end_step(self) -> None:
        self.metadata = None

    def set_metadata(self, metadata) -> None:
        self.begin_step(metadata)

    def advance(self, num_tokens: int) -> None:
        """Nothing to move: positions live in the metadata."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, N, Hq, D], k and v [1, N, Hkv, D] (packed batch) -> [1, N, Hq, D]."""
        m = step_metadata(self, q)
        q, k, v = q[0], k[0], v[0]
        keep = m.slot_mapping >= 0
        self.codec.write(self.stores[layer], k[keep], v[keep], m.slot_mapping[keep])
        tables = m.block_tables
        used = tables[tables >= 0].unique()
        kd, vd = self.codec.read(self.stores[layer], used.long(), self.dtype)
        remap = torch.full((self.num_blocks,), -1, dtype=tables.dtype, device=tables.device)
        remap[used.long()] = torch.arange(used.numel(), dtype=tables.dtype, device=tables.device)
        local = torch.where(tables >= 0, remap[tables.clamp(min=0).long()], tables)
        if m.is_decode:
            out = self.ops.paged_decode_attention(q, kd, vd, local, m.context_lens, self.scale)
        else:
            out = self.ops.paged_prefill_attention(q, kd, vd, local, m.query_start_loc,
                                                   m.context_lens, self.scale)
        return out.unsqueeze(0)
