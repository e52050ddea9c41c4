"""The built-in quantized KV formats as block codecs: one small class per format, one protocol.

A codec owns the block storage of one format for every layer (codes, scales, zeros, fp8's per-layer
scales and key shifts) in the layout the Triton kernels of kvlab/kernels/ read (docs/architecture.md
section 4), and does two things to it, with kvlab.quant's PyTorch quantizers (the reference):

    encode(layer, k, v, slots, skip_first=None)   # k, v [N, Hkv, D] into the flat slots [N]
    decode(layer, blocks, dtype) -> (k, v)        # whole blocks -> [len(blocks), BS, Hkv, D] each

`seals_blocks` says when a chunk can be encoded. Per-token formats (int8, fp8) encode any tokens
as they arrive. KIVI's int4 and int2 quantize keys per channel over a whole block, so they encode
only whole blocks (`slots` a multiple of block_size, each run of block_size slots one block in
order); until a block is full its tokens wait in full-precision rows (kvlab/cache/rows.py), and
`skip_first` [N // block_size] bool marks the first blocks whose offset-0 token (an attention
sink, kept in its own row) must not set the key scales.

`kernel_args(layer)` are the codec's keyword arguments of kvlab.attention.paged_triton, and
`store_keys` / `load_keys` the one key transform a format may have (fp8 smoothing: keys are stored
minus a calibrated per-channel shift; attention reads them as stored, the reference read adds it back).
The cache that composes a codec with the row pool is kvlab/cache/quantized.py.
"""
from __future__ import annotations

from typing import Protocol

import torch

from kvlab.quant import fp8, int4, int8


class BlockCodec(Protocol):
    name: str
    seals_blocks: bool

    def encode(self, layer: int, k, v, slots, skip_first=None) -> None: ...
    def decode(self, layer: int, blocks, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]: ...
    def kernel_args(self, layer: int) -> dict: ...
    def store_keys(self, layer: int, k: torch.Tensor) -> torch.Tensor: ...
    def load_keys(self, layer: int, k: torch.Tensor) -> torch.Tensor: ...
    def tensors(self) -> list: ...


def _zeros(num_layers, *shape, dtype, device):
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


class _Codec:
    """What every built-in codec shares: shape, the identity key transform, the byte count."""
    seals_blocks = False

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, device="cpu"):
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.device = num_kv_heads, head_dim, torch.device(device)

    def store_keys(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        return k

    def load_keys(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        return k

    def tensors(self) -> list:
        """Every tensor the codec holds (all layers)."""
        return [t for name in self.STORAGE for t in getattr(self, name)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        """A block-indexed tensor [NB, BS, ...] seen as [NB * BS, ...] (one row per slot)."""
        return t.view(self.num_blocks * self.block_size, *t.shape[2:])


class Int8Codec(_Codec):
    """int8 codes [NB, BS, Hkv, D], symmetric per token and KV head; float16 scales [NB, BS, Hkv]."""
    name = "int8"
    STORAGE = ("k_cache", "v_cache", "k_scale", "v_scale")

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, device="cpu"):
        super().__init__(num_layers, num_blocks, block_size, num_kv_heads, head_dim, device)
        NB, BS, H, D = num_blocks, block_size, num_kv_heads, head_dim
        self.k_cache, self.v_cache = (_zeros(num_layers, NB, BS, H, D, dtype=torch.int8, device=device)
                                      for _ in "kv")
        self.k_scale, self.v_scale = (_zeros(num_layers, NB, BS, H, dtype=torch.float16, device=device)
                                      for _ in "kv")

    def encode(self, layer, k, v, slots, skip_first=None) -> None:
        for x, codes, scales in ((k, self.k_cache, self.k_scale), (v, self.v_cache, self.v_scale)):
            q, s = int8.quantize_int8(x)
            self._flat(codes[layer]).index_copy_(0, slots, q)
            self._flat(scales[layer]).index_copy_(0, slots, s)

    def decode(self, layer, blocks, dtype):
        return (int8.dequantize_int8(self.k_cache[layer][blocks], self.k_scale[layer][blocks], dtype),
                int8.dequantize_int8(self.v_cache[layer][blocks], self.v_scale[layer][blocks], dtype))

    def kernel_args(self, layer: int) -> dict:
        return dict(k_scale=self.k_scale[layer], v_scale=self.v_scale[layer])


class Fp8Codec(_Codec):
    """float8_e4m3fn codes [NB, BS, Hkv, D]; float32 scales per layer ([] or [Hkv]) and an optional
    key shift [Hkv, D] per layer, from `calibration` (kvlab.quant.fp8.Fp8Calibration; None: scale
    1.0, no shift)."""
    name = "fp8"
    STORAGE = ("k_cache", "v_cache", "k_scale", "v_scale")

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, device="cpu",
                 calibration=None):
        super().__init__(num_layers, num_blocks, block_size, num_kv_heads, head_dim, device)
        NB, BS, H, D = num_blocks, block_size, num_kv_heads, head_dim
        self.k_cache, self.v_cache = (_zeros(num_layers, NB, BS, H, D, dtype=fp8.FP8, device=device)
                                      for _ in "kv")
        cal = calibration or fp8.Fp8Calibration([1.0] * num_layers, [1.0] * num_layers)
        cal = cal.check(num_layers, num_kv_heads, head_dim)
        self.k_scale, self.v_scale = ([x.to(self.device) for x in xs] for xs in (cal.k_scales, cal.v_scales))
        self.k_shift = None if cal.k_shift is None else [x.to(self.device) for x in cal.k_shift]

    def tensors(self) -> list:
        return super().tensors() + (list(self.k_shift) if self.k_shift is not None else [])

    def _shift(self, layer: int):
        return None if self.k_shift is None else self.k_shift[layer]

    def store_keys(self, layer, k):
        """Keys minus the layer's shift, in float32 then back to k's dtype (the same on both paths)."""
        shift = self._shift(layer)
        return k if shift is None else (k.float() - shift).to(k.dtype)

    def load_keys(self, layer, k):
        """Stored keys with the shift added back (in float32), still in float32 when shifted."""
        shift = self._shift(layer)
        return k if shift is None else k.float() + shift

    def encode(self, layer, k, v, slots, skip_first=None) -> None:
        """k are the stored keys (`store_keys` already applied)."""
        for x, codes, scale in ((k, self.k_cache, self.k_scale), (v, self.v_cache, self.v_scale)):
            q = fp8.quantize_fp8(x, scale[layer]).view(torch.uint8)   # CPU index_copy_ lacks fp8
            self._flat(codes[layer].view(torch.uint8)).index_copy_(0, slots, q)

    def decode(self, layer, blocks, dtype):
        return (fp8.dequantize_fp8(self.k_cache[layer][blocks], self.k_scale[layer], dtype, self._shift(layer)),
                fp8.dequantize_fp8(self.v_cache[layer][blocks], self.v_scale[layer], dtype))

    def kernel_args(self, layer: int) -> dict:
        return dict(k_scale=self.k_scale[layer], v_scale=self.v_scale[layer])


class KiviCodec(_Codec):
    """KIVI (Liu et al., 2024): asymmetric, `bits` per code packed into uint8 [NB, BS, Hkv, D*bits/8];
    keys per channel over a whole block (float16 scale and zero [NB, Hkv, D]), values per token
    per group of 32 channels ([NB, BS, Hkv, D/32]). Encodes whole blocks only (`seals_blocks`)."""
    seals_blocks = True
    bits = 4
    STORAGE = ("k_cache", "v_cache", "k_scale", "v_scale", "k_zero", "v_zero")

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, device="cpu"):
        super().__init__(num_layers, num_blocks, block_size, num_kv_heads, head_dim, device)
        NB, BS, H, D, b = num_blocks, block_size, num_kv_heads, head_dim, self.bits
        G = D // int4.value_group(D, b)            # raises for a head_dim it cannot group or pack
        z = dict(dtype=torch.float16, device=device)
        self.k_cache, self.v_cache = (_zeros(num_layers, NB, BS, H, D * b // 8, dtype=torch.uint8,
                                             device=device) for _ in "kv")
        self.k_scale, self.k_zero = (_zeros(num_layers, NB, H, D, **z) for _ in "sz")
        self.v_scale, self.v_zero = (_zeros(num_layers, NB, BS, H, G, **z) for _ in "sz")

    def encode(self, layer, k, v, slots, skip_first=None) -> None:
        BS = self.block_size
        if slots.numel() % BS or bool((slots.view(-1, BS) - slots.view(-1, BS)[:, :1]
                                       != torch.arange(BS, device=slots.device)).any()):
            raise ValueError(f"{self.name} encodes whole blocks: slots must be runs of block_size "
                             f"({BS}) consecutive slots starting at a block's offset 0")
        blocks = (slots.view(-1, BS)[:, 0] // BS).tolist()
        kb, vb = k.view(-1, BS, *k.shape[1:]), v.view(-1, BS, *v.shape[1:])
        skip = [False] * len(blocks) if skip_first is None else [bool(s) for s in skip_first]
        for i, b in enumerate(blocks):
            (self.k_cache[layer][b], self.k_scale[layer][b],
             self.k_zero[layer][b]) = int4.quantize_keys(kb[i], self.bits, skip_first=skip[i])
            (self.v_cache[layer][b], self.v_scale[layer][b],
             self.v_zero[layer][b]) = int4.quantize_values(vb[i], bits=self.bits)

    def decode(self, layer, blocks, dtype):
        return (int4.dequantize_keys(self.k_cache[layer][blocks], self.k_scale[layer][blocks],
                                     self.k_zero[layer][blocks], dtype, self.bits),
                int4.dequantize_values(self.v_cache[layer][blocks], self.v_scale[layer][blocks],
                                       self.v_zero[layer][blocks], dtype, self.bits))

    def kernel_args(self, layer: int) -> dict:
        return dict(k_scale=self.k_scale[layer], v_scale=self.v_scale[layer],
                    k_zero=self.k_zero[layer], v_zero=self.v_zero[layer])


class Int4Codec(KiviCodec):
    """KIVI 4-bit: two channels a byte, the low nibble the even channel."""
    name, bits = "int4", 4


class Int2Codec(KiviCodec):
    """KIVI 2-bit: four channels a byte, channel 4j + i in bits 2i, 2i + 1."""
    name, bits = "int2", 2


#: kv_cache_dtype -> codec class (kvlab.quant.common.KV_CACHE_DTYPES but "auto").
CODECS = {"int8": Int8Codec, "fp8": Fp8Codec, "int4": Int4Codec, "int2": Int2Codec}


def make_codec(kv_cache_dtype: str, num_layers: int, num_blocks: int, block_size: int,
               num_kv_heads: int, head_dim: int, device="cpu", fp8_calibration=None):
    """The codec of `kv_cache_dtype` with its storage allocated; `fp8_calibration` only for fp8."""
    if kv_cache_dtype not in CODECS:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, CODECS))} for a quantized "
                         f"cache, got {kv_cache_dtype!r}")
    if fp8_calibration is not None and kv_cache_dtype != "fp8":
        raise ValueError(f"fp8_calibration is only for kv_cache_dtype='fp8', not {kv_cache_dtype!r}")
    extra = {} if fp8_calibration is None else dict(calibration=fp8_calibration)
    return CODECS[kv_cache_dtype](num_layers, num_blocks, block_size, num_kv_heads, head_dim, device, **extra)
