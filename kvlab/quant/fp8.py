"""fp8 KV cache: float8 e4m3fn values times a scale per tensor or per KV head.

e4m3fn (Micikevicius et al., 2022, "FP8 Formats for Deep Learning") has 4 exponent bits and 3
mantissa bits: magnitudes up to 448, relative spacing 2**-3, so rounding a normal number costs at
most 2**-4 of its size, and numbers below 2**-6 lose relative precision (subnormals, spacing 2**-9).
A floating-point code needs no per-token scale: each element carries its own exponent. A scale
still matters at the two ends of the range: values above 448 * scale saturate, values far below
2**-6 * scale flush towards zero. So the cache keeps a float32 scale per layer, either one per
tensor `[]` or one per KV head `[Hkv]`, `x ~= q * scale`, set by

- the default 1.0 (what an engine does when nobody calibrated: the raw values are the fp8 values), or
- calibration: `scale = amax / 448` over keys (values) seen on sample text, so the largest value
  seen uses the top of the range. Values larger than any seen during calibration saturate.

Bytes per token per KV head: D, i.e. exactly half of bfloat16 (the scales are per layer).
"""
from __future__ import annotations

import torch

from kvlab.quant.common import check_finite

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def _broadcast(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scale [] (per tensor) or [Hkv] (per head) against x [..., Hkv, D]."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if scale.dim() == 0:
        return scale
    if scale.dim() != 1 or x.dim() < 2 or scale.shape[0] != x.shape[-2]:
        raise ValueError(f"fp8 scale must be [] or [Hkv] = [{x.shape[-2] if x.dim() > 1 else '?'}], "
                         f"got {tuple(scale.shape)}")
    return scale.view(-1, 1)


def fp8_scale(x: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """Calibrated scale amax / 448 of x [..., Hkv, D]: [] per tensor, or [Hkv] per KV head."""
    check_finite(x, "x")
    a = x.float().abs()
    amax = a.amax() if not per_head else a.transpose(-2, 0).reshape(x.shape[-2], -1).amax(dim=1)
    return (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """x [..., Hkv, D] -> float8_e4m3fn codes with x ~= q * scale; saturates at +-448 * scale."""
    check_finite(x, "x")
    s = _broadcast(scale, x)
    if not bool((s > 0).all()):
        raise ValueError("fp8 scale must be positive")
    return (x.float() / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor | float = 1.0,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8 codes [..., Hkv, D] -> x in `dtype`."""
    return (q.float() * _broadcast(scale, q)).to(dtype)


class _AmaxRecorder:
    """A KV cache (no storage) that records each layer's key and value amax, per KV head."""

    def __init__(self, num_layers: int):
        self.k_amax = [None] * num_layers
        self.v_amax = [None] * num_layers

    def attend(self, layer, q, k, v):
        from kvlab.cache.base import causal_attention

        for store, x in ((self.k_amax, k), (self.v_amax, v)):
            a = x.detach().float().abs().amax(dim=(0, 1, 3))  # [Hkv]
            store[layer] = a if store[layer] is None else torch.maximum(store[layer], a)
        return causal_attention(q, k, v)

    def advance(self, num_tokens):
        pass


@torch.no_grad()
def calibrate_fp8_scales(model, batches, per_head: bool = False) -> tuple[list, list]:
    """Per-layer fp8 scales from sample text: `amax / 448` of keys and of values.

    `batches`: an iterable of input_ids tensors [B, T] (the calibration text). Returns
    (k_scales, v_scales): lists with one tensor per layer, `[]` (per tensor) or `[Hkv]` (per head).
    """
    rec = _AmaxRecorder(model.config.num_layers)
    for ids in batches:
        model(ids, cache=rec, last_only=True)
    tiny = torch.finfo(torch.float32).tiny

    def to_scale(a):
        a = a if per_head else a.amax()
        return (a / FP8_MAX).clamp_min(tiny)

    return [to_scale(a) for a in rec.k_amax], [to_scale(a) for a in rec.v_amax]
