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

Keys can also be *smoothed*: a calibrated per-channel mean `k_shift [Hkv, D]` is subtracted before
quantizing, so fp8 rounds the deviation from the mean rather than the key (the key smoothing of
SageAttention, Zhang et al., 2024, with a mean calibrated once instead of taken per call). Keys of
Llama-style models sit on large per-channel offsets (about half of a key's magnitude is its mean
on SmolLM2-135M), and e4m3's relative rounding error of up to 2**-4 applies to the whole value;
subtracting the offset shrinks the absolute error by the same factor. No read has to add the shift
back: every score of one query moves by the same `q . k_shift`, and softmax ignores a constant
added to all of a row's scores, so attention over the smoothed keys is the attention over the
keys. Correctness never depends on the shift's value; only the accuracy does.

Bytes per token per KV head: D, i.e. exactly half of bfloat16 (scales and shifts are per layer).
"""
from __future__ import annotations

from dataclasses import dataclass

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


def _check_shift(shift, x: torch.Tensor):
    if shift is None:
        return None
    shift = torch.as_tensor(shift, dtype=torch.float32, device=x.device)
    if x.dim() < 2 or tuple(shift.shape) != tuple(x.shape[-2:]):
        raise ValueError(f"fp8 shift must be [Hkv, D] = {list(x.shape[-2:])}, got {list(shift.shape)}")
    return shift


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float = 1.0,
                 shift: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., Hkv, D] -> float8_e4m3fn codes with x ~= q * scale (+ shift [Hkv, D], if given);
    saturates at +-448 * scale."""
    check_finite(x, "x")
    s = _broadcast(scale, x)
    if not bool((s > 0).all()):
        raise ValueError("fp8 scale must be positive")
    x = x.float()
    shift = _check_shift(shift, x)
    if shift is not None:
        x = x - shift
    return (x / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor | float = 1.0,
                   dtype: torch.dtype = torch.float32, shift: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """float8 codes [..., Hkv, D] -> x in `dtype` (the shift added back, if given)."""
    x = q.float() * _broadcast(scale, q)
    shift = _check_shift(shift, x)
    return (x if shift is None else x + shift).to(dtype)


@dataclass
class Fp8Calibration:
    """What an fp8 cache needs besides its codes, one entry per layer.

    k_scales, v_scales: positive float32 `[]` (per tensor) or `[Hkv]` (per KV head).
    k_shift: None, or float32 `[Hkv, D]` per layer subtracted from keys before quantizing
    (key smoothing, module docstring). `None` for the whole object means scale 1.0, no shift.
    """
    k_scales: list
    v_scales: list
    k_shift: list | None = None

    def check(self, num_layers: int, num_kv_heads: int, head_dim: int) -> Fp8Calibration:
        """Validated float32 copies; every error names the field and the shape it needs."""
        def scales(name, xs):
            if len(xs) != num_layers:
                raise ValueError(f"fp8 calibration: {name} needs one scale per layer ({num_layers}), "
                                 f"got {len(xs)}")
            out = [torch.as_tensor(x, dtype=torch.float32).contiguous() for x in xs]
            for x in out:
                if tuple(x.shape) not in ((), (num_kv_heads,)) or not bool((x > 0).all()):
                    raise ValueError(f"fp8 calibration: each of {name} must be positive, of shape [] "
                                     f"or [{num_kv_heads}] (per KV head), got {x.tolist()}")
            return out

        shift = None
        if self.k_shift is not None:
            if len(self.k_shift) != num_layers:
                raise ValueError(f"fp8 calibration: k_shift needs one [Hkv, D] tensor per layer "
                                 f"({num_layers}), got {len(self.k_shift)}")
            shift = [torch.as_tensor(x, dtype=torch.float32).contiguous() for x in self.k_shift]
            for x in shift:
                if tuple(x.shape) != (num_kv_heads, head_dim) or not bool(torch.isfinite(x).all()):
                    raise ValueError(f"fp8 calibration: each k_shift must be finite, of shape "
                                     f"[{num_kv_heads}, {head_dim}], got {list(x.shape)}")
        return Fp8Calibration(scales("k_scales", self.k_scales), scales("v_scales", self.v_scales),
                              shift)


class _KVStats:
    """A KV cache (no storage) that records, per layer, each key and value channel's min, max and sum."""

    def __init__(self, num_layers: int):
        self.stats = {"k": [None] * num_layers, "v": [None] * num_layers}
        self.count = 0

    def attend(self, layer, q, k, v):
        from kvlab.cache.base import causal_attention

        if layer == 0:
            self.count += k.shape[0] * k.shape[1]
        for name, x in (("k", k), ("v", v)):
            x = x.detach().float().reshape(-1, *x.shape[-2:])       # [N, Hkv, D]
            new = (x.amin(0), x.amax(0), x.sum(0))
            old = self.stats[name][layer]
            self.stats[name][layer] = new if old is None else (
                torch.minimum(old[0], new[0]), torch.maximum(old[1], new[1]), old[2] + new[2])
        return causal_attention(q, k, v)

    def advance(self, num_tokens):
        pass


def _scale(lo: torch.Tensor, hi: torch.Tensor, shift, per_head: bool) -> torch.Tensor:
    """amax / 448 of values in [lo, hi] per channel [Hkv, D], minus `shift` if given."""
    if shift is not None:
        lo, hi = lo - shift, hi - shift
    a = torch.maximum(hi.abs(), lo.abs()).amax(dim=1)              # [Hkv]
    a = a if per_head else a.amax()
    return (a / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def calibrate_fp8(model, batches, per_head: bool = True, smooth_keys: bool = True) -> Fp8Calibration:
    """fp8 scales (and key shifts) of every layer from sample text.

    `batches`: an iterable of input_ids tensors [B, T] (the calibration text). Scales are
    `amax / 448` of the keys (values) seen, per KV head or per tensor, so the largest value seen
    uses the top of the range; with `smooth_keys`, `k_shift` is the mean key per channel and the
    key scales are taken over `key - k_shift`.
    """
    rec = _KVStats(model.config.num_layers)
    for ids in batches:
        model(ids, cache=rec, last_only=True)
    if rec.count == 0:
        raise ValueError("calibrate_fp8 needs at least one token of calibration text")
    shifts = [st[2] / rec.count for st in rec.stats["k"]] if smooth_keys else None
    k_scales = [_scale(lo, hi, shifts[i] if smooth_keys else None, per_head)
                for i, (lo, hi, _) in enumerate(rec.stats["k"])]
    v_scales = [_scale(lo, hi, None, per_head) for lo, hi, _ in rec.stats["v"]]
    return Fp8Calibration(k_scales, v_scales, shifts)
