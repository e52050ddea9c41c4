"""A contiguous cache that stores what a quantized cache would return: the slow twin for accuracy.

`FakeQuantKVCache` quantizes each key and value on write and keeps the *dequantized* result
(simulated or "fake" quantization). Attention then sees exactly the numbers a real quantized cache
(`kvlab.quant.paged.QuantizedPagedKVCache`) dequantizes on read, without the paged bookkeeping, so
it measures what a format costs in accuracy, and the tests check the two agree.

Timing of quantization follows decoding exactly, for any number of new tokens per forward:

- int8 and fp8 quantize each token on its own (per-token or fixed scales), so a token's stored value
  does not depend on when it is written, and a forward over T tokens attends exactly as T decode
  steps would: every query sees every key, its own included, already quantized.
- int4 (KIVI) quantizes a key group only when its G tokens are all there. A decoding query sees the
  complete groups quantized and its own, partial group (the residual window) in full precision. A
  forward over T tokens is split at group boundaries so that each query sees the same thing; a
  group is quantized right after the queries of its last token have attended.

So the perplexity of a window processed in chunks equals, to rounding, the perplexity of the same
window fed one token at a time, at a fraction of the cost.
"""
from __future__ import annotations

import torch

from kvlab.cache.base import causal_attention
from kvlab.quant import fp8, int4, int8
from kvlab.quant.common import check_kv_cache_dtype


def roundtrip(x: torch.Tensor, kv_cache_dtype: str, scale: torch.Tensor | float = 1.0,
              shift: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize per-token formats: x [..., Hkv, D] ("auto", "int8", "fp8";
    fp8 with its scale and optional shift)."""
    if kv_cache_dtype == "auto":
        return x
    if kv_cache_dtype == "int8":
        return int8.dequantize_int8(*int8.quantize_int8(x), dtype=x.dtype)
    if kv_cache_dtype == "fp8":
        return fp8.dequantize_fp8(fp8.quantize_fp8(x, scale, shift), scale, x.dtype, shift)
    raise ValueError(f"roundtrip handles 'auto', 'int8', 'fp8' (int4 quantizes groups), "
                     f"got {kv_cache_dtype!r}")


class FakeQuantKVCache:
    """Contiguous `[B, max_len, Hkv, D]` per layer of dequantized keys and values; all rows equally long.

    fp8: `fp8_calibration`, a `kvlab.quant.fp8.Fp8Calibration` (None = scale 1.0, no key shift).
    int4 and int2: `group_size` tokens per key group (the paged cache's block size).
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 kv_cache_dtype: str = "auto", group_size: int = 16, fp8_calibration=None,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        self.num_layers, self.max_len, self.group_size = num_layers, max_len, group_size
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        cal = fp8_calibration or fp8.Fp8Calibration([1.0] * num_layers, [1.0] * num_layers)
        self.fp8 = cal.check(num_layers, num_kv_heads, head_dim)
        self.length = 0

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, kv_cache_dtype: str = "auto", **kw):
        c = model.config
        return cls(c.num_layers, batch, c.num_kv_heads, c.head_dim, max_len, kv_cache_dtype,
                   dtype=model.dtype, device=model.device, **kw)

    @property
    def position_offset(self) -> int:
        return self.length

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T = q.shape[1]
        start = self.length
        if start + T > self.max_len:
            raise ValueError(f"FakeQuantKVCache holds {self.max_len} tokens; {start} + {T} exceeds it")
        if self.kv_cache_dtype not in int4.FORMAT_BITS:
            K, V = self.k[layer], self.v[layer]
            cal = self.fp8
            shift = cal.k_shift[layer].to(k.device) if cal.k_shift is not None else None
            K[:, start:start + T] = roundtrip(k, self.kv_cache_dtype, cal.k_scales[layer].to(k.device), shift)
            V[:, start:start + T] = roundtrip(v, self.kv_cache_dtype, cal.v_scales[layer].to(v.device))
            return causal_attention(q, K[:, :start + T], V[:, :start + T], q_offset=start)
        outs, i = [], 0
        while i < T:  # pieces that end at group boundaries: decode-exact timing (module docstring)
            pos = start + i
            n = min(T - i, self.group_size - pos % self.group_size)
            outs.append(self._attend_int4_piece(layer, q[:, i:i + n], k[:, i:i + n], v[:, i:i + n], pos))
            i += n
        return torch.cat(outs, dim=1)

    def _attend_int4_piece(self, layer, q, k, v, pos):
        n, G = q.shape[1], self.group_size
        K, V = self.k[layer], self.v[layer]
        K[:, pos:pos + n], V[:, pos:pos + n] = k, v  # full precision: the residual window
        out = causal_attention(q, K[:, :pos + n], V[:, :pos + n], q_offset=pos)
        end = pos + n
        if end % G == 0:  # the group is complete: quantize keys per channel, values per token
            g0 = end - G
            bits = int4.FORMAT_BITS[self.kv_cache_dtype]
            K[:, g0:end] = int4.dequantize_keys(*int4.quantize_keys(K[:, g0:end], bits), K.dtype, bits)
            V[:, g0:end] = int4.dequantize_values(*int4.quantize_values(V[:, g0:end], bits=bits),
                                                  V.dtype, bits)
        return out

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
