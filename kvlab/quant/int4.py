"""int4 KV cache, KIVI-style: asymmetric, keys per channel, values per token, a residual window.

Liu et al. (2024), "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", observe that
keys have *outlier channels*: a few of the D channels are large for every token (RoPE pairs with
slow rotation carry most of the energy). A per-token scale would be set by the outlier channel and
crush every other channel to a code or two. So KIVI quantizes

- **keys per channel**, over a group of G consecutive tokens: each channel of each KV head gets its
  own (scale, zero point) from its min and max over the G tokens. Outlier channels get wide steps,
  quiet channels narrow ones.
- **values per token**, over groups of `VALUE_GROUP` channels: values have no channel outliers, and
  the attention output is a per-token mix of value rows, so per-token error is what matters.
- **asymmetric**: `x ~= q * scale + zero`, q in 0..15, `zero = min`, `scale = (max - min) / 15`.
  Post-RoPE keys of a channel are often all of one sign; a symmetric grid would waste half its codes.
- **a residual window**: a key group needs all G of its tokens before its per-channel min/max exist,
  so the newest tokens (fewer than G) stay in full precision until their group fills.

kvlab ties the key group to the paged layout: **G = block_size**, so a group fills exactly when its
block fills, and a block is either complete and quantized, or the sequence's last, partial block,
held in full precision (the residual window, 0 .. G-1 tokens). Values of the residual tokens stay
in full precision too, so a block is quantized in one step when it fills.

Storage (docs/architecture.md section 4), per layer, for K and for V:
codes uint8 `[NB, BS, Hkv, D/2]`, two 4-bit codes per byte, low nibble = even channel;
key scale and zero float16 `[NB, Hkv, D]` (per block = per group, per channel);
value scale and zero float16 `[NB, BS, Hkv, D / VALUE_GROUP]` (one group when D < 32).
Zero points are rounded down and scales up to float16, so every value stays inside the code range
and the rounding error of each element is at most scale / 2.
"""
from __future__ import annotations

import torch

from kvlab.quant.common import check_finite, round_down_fp16, round_up_fp16

BITS = 4
LEVELS = 2**BITS - 1  # 15
#: Channels that share one value scale (KIVI's group size).
VALUE_GROUP = 32
MIN_SCALE = float(torch.finfo(torch.float16).tiny)
MAX_ABS = float(torch.finfo(torch.float16).max)  # float16 zero points


def value_group(head_dim: int) -> int:
    """Channels per value scale for this head_dim: VALUE_GROUP, or the whole head when smaller."""
    g = min(VALUE_GROUP, head_dim)
    if head_dim % g or head_dim % 2:
        raise ValueError(f"int4 needs an even head_dim that is a multiple of {VALUE_GROUP} "
                         f"(or below it), got {head_dim}")
    return g


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [..., D] in 0..15 -> bytes uint8 [..., D/2]; low nibble = even channel."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Bytes uint8 [..., D/2] -> codes uint8 [..., D] (the inverse of pack_int4)."""
    return torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)


def _asymmetric(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale and zero of x with min/max taken over `dim` (kept as a size-1 dim)."""
    check_finite(x, "x")
    x = x.float()
    if x.numel() and float(x.abs().max()) > MAX_ABS:
        raise ValueError(f"x has magnitude {float(x.abs().max()):.3g}; int4 with float16 zero "
                         f"points holds at most {MAX_ABS:.3g}")
    zero = round_down_fp16(x.amin(dim=dim, keepdim=True))
    scale = round_up_fp16(((x.amax(dim=dim, keepdim=True) - zero.float()) / LEVELS).clamp_min(MIN_SCALE))
    q = torch.round((x - zero.float()) / scale.float()).clamp_(0, LEVELS).to(torch.uint8)
    return q, scale, zero


def quantize_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One key group k [..., G, Hkv, D] (G tokens) -> (packed [..., G, Hkv, D/2],
    scale [..., Hkv, D], zero [..., Hkv, D]): per channel over the G tokens."""
    q, scale, zero = _asymmetric(k, dim=-3)
    return pack_int4(q), scale.squeeze(-3), zero.squeeze(-3)


def dequantize_keys(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed [..., G, Hkv, D/2], scale [..., Hkv, D], zero [..., Hkv, D]) -> k [..., G, Hkv, D]."""
    q = unpack_int4(packed).float()
    return (q * scale.float().unsqueeze(-3) + zero.float().unsqueeze(-3)).to(dtype)


def quantize_values(v: torch.Tensor, group: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v [..., Hkv, D] -> (packed [..., Hkv, D/2], scale [..., Hkv, D/group], zero [..., Hkv, D/group]):
    per token, per group of `group` consecutive channels."""
    D = v.shape[-1]
    group = value_group(D) if group is None else group
    if D % group:
        raise ValueError(f"head_dim ({D}) must be a multiple of the value group ({group})")
    g = v.unflatten(-1, (D // group, group))  # [..., Hkv, D/group, group]
    q, scale, zero = _asymmetric(g, dim=-1)
    return pack_int4(q.flatten(-2)), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_values(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed [..., Hkv, D/2], scale and zero [..., Hkv, D/group]) -> v [..., Hkv, D]."""
    q = unpack_int4(packed).float()
    n = scale.shape[-1]
    g = q.unflatten(-1, (n, q.shape[-1] // n))
    return (g * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).flatten(-2).to(dtype)
