"""A contiguous cache that stores what a quantized cache would return: the slow twin for accuracy.

`FakeQuantKVCache` quantizes each key and value on write and keeps the *dequantized* result
(simulated or "fake" quantization). Attention then sees exactly the numbers a real quantized cache
(`kvlab.cache.quantized.QuantizedPagedKVCache`) dequantizes on read, without the paged bookkeeping, so
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

Attention-sink preservation (`keep_first=n`): the first n positions of every sequence are stored
exactly as written, in full precision, for every format (StreamingLLM, Xiao et al. 2023, for the
sink; KVQuant and IntactKV keep such tokens unquantized). What "exactly as written" means next to
fp8's key shift: this cache dequantizes smoothed keys *with* the shift added back
(`fp8.dequantize_fp8(..., shift)` returns `dq(k - shift) + shift`), so every stored key is a key,
and a kept key is stored as the key itself, the value the full-precision cache stores. The paged
cache instead stores `k - shift` and reads it as stored (every score of a query moves by
`q . shift`, which softmax ignores only if *every* key moved); a kept key there must be stored as
`k - shift` in full precision. Both conventions give the same attention.
int4 and int2 quantize a group without its kept tokens: the per-channel key scales and zero points
come from the group's other tokens only (values are per token, so theirs are unaffected). An
engine that holds the sinks apart stores no codes for them, and a sink key far from the others
would otherwise widen the steps of every other key in its group. A group made only of kept tokens
is not quantized. Timing is unchanged: kept positions are full precision whenever they are read.
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
    `keep_first`: the first positions of every sequence stored in full precision (module docstring).
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 kv_cache_dtype: str = "auto", group_size: int = 16, fp8_calibration=None,
                 dtype: torch.dtype = torch.float32, device="cpu", keep_first: int = 0):
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        if isinstance(keep_first, bool) or not isinstance(keep_first, int) or keep_first < 0:
            raise ValueError(f"keep_first must be a non-negative int (positions kept in full "
                             f"precision), got {keep_first!r}")
        self.num_layers, self.max_len, self.group_size = num_layers, max_len, group_size
        self.keep_first = keep_first
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
            n = min(T, self.keep_first - start)
            if n > 0:  # kept positions: the keys and values as written (module docstring)
                K[:, start:start + n], V[:, start:start + n] = k[:, :n], v[:, :n]
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
        g0 = max(end - G, self.keep_first)  # kept positions are not quantized (module docstring)
        if end % G == 0 and g0 < end:  # the group is complete: keys per channel, values per token
            bits = int4.FORMAT_BITS[self.kv_cache_dtype]
            K[:, g0:end] = int4.dequantize_keys(*int4.quantize_keys(K[:, g0:end], bits), K.dtype, bits)
            V[:, g0:end] = int4.dequantize_values(*int4.quantize_values(V[:, g0:end], bits=bits),
                                                  V.dtype, bits)
        return out

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
