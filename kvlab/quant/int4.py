"""int4 (and int2) KV cache, KIVI-style: asymmetric, keys per channel, values per token, a residual window.

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

int2 is the same scheme with 2-bit codes (q in 0..3, `scale = (max - min) / 3`), four per byte:
KIVI's own setting. Every function takes `bits` (4 or 2).

Storage (docs/architecture.md section 4), per layer, for K and for V:
codes uint8 `[NB, BS, Hkv, D/2]`, two 4-bit codes per byte, low nibble = even channel (int2:
`[NB, BS, Hkv, D/4]`, four codes per byte, channel 4j + i in bits 2i and 2i + 1);
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
#: kv_cache_dtype -> bits per code, for the formats this module quantizes.
FORMAT_BITS = {"int4": 4, "int2": 2}
#: Channels that share one value scale (KIVI's group size).
VALUE_GROUP = 32
MIN_SCALE = float(torch.finfo(torch.float16).tiny)
MAX_ABS = float(torch.finfo(torch.float16).max)  # float16 zero points


def _check_bits(bits: int) -> int:
    if bits not in (2, 4):
        raise ValueError(f"bits must be 4 (int4) or 2 (int2), got {bits}")
    return bits


def value_group(head_dim: int, bits: int = 4) -> int:
    """Channels per value scale for this head_dim: VALUE_GROUP, or the whole head when smaller.
    Raises unless head_dim is a multiple of the group and of the codes per byte (8 / bits)."""
    g, per_byte = min(VALUE_GROUP, head_dim), 8 // _check_bits(bits)
    if head_dim % g or head_dim % per_byte:
        raise ValueError(f"int{bits} needs a head_dim that is a multiple of {per_byte} and of "
                         f"{VALUE_GROUP} (or below {VALUE_GROUP}), got {head_dim}")
    return g


def pack_codes(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Codes uint8 [..., D] in 0..2**bits-1 -> bytes uint8 [..., D*bits/8]; code i of each byte's
    8/bits channels sits in bits i*bits and up (int4: low nibble = even channel)."""
    n = 8 // _check_bits(bits)
    if q.shape[-1] % n:
        raise ValueError(f"packing {bits}-bit codes needs a last dimension divisible by {n}, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    out = q[..., 0::n].clone()
    for i in range(1, n):
        out |= q[..., i::n] << (i * bits)
    return out


def unpack_codes(p: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Bytes uint8 [..., D*bits/8] -> codes uint8 [..., D] (the inverse of pack_codes)."""
    n, mask = 8 // _check_bits(bits), 2**bits - 1
    return torch.stack([(p >> (i * bits)) & mask for i in range(n)], dim=-1).flatten(-2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [..., D] in 0..15 -> bytes uint8 [..., D/2]; low nibble = even channel."""
    return pack_codes(q, 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Bytes uint8 [..., D/2] -> codes uint8 [..., D] (the inverse of pack_int4)."""
    return unpack_codes(p, 4)


def _asymmetric(x: torch.Tensor, dim: int, bits: int = 4, skip_first: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale and zero of x with min/max taken over `dim` (kept as a size-1 dim); with
    `skip_first`, over every index of `dim` but the first (whose codes are then clamped)."""
    levels = 2**_check_bits(bits) - 1
    check_finite(x, "x")
    x = x.float()
    if x.numel() and float(x.abs().max()) > MAX_ABS:
        raise ValueError(f"x has magnitude {float(x.abs().max()):.3g}; int{bits} with float16 zero "
                         f"points holds at most {MAX_ABS:.3g}")
    if skip_first and x.shape[dim] < 2:
        raise ValueError(f"skip_first needs a group of at least 2, got {x.shape[dim]}")
    stats = x.narrow(dim, 1, x.shape[dim] - 1) if skip_first else x
    zero = round_down_fp16(stats.amin(dim=dim, keepdim=True))
    scale = round_up_fp16(((stats.amax(dim=dim, keepdim=True) - zero.float()) / levels).clamp_min(MIN_SCALE))
    q = torch.round((x - zero.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return q, scale, zero


def quantize_keys(k: torch.Tensor, bits: int = 4, skip_first: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One key group k [..., G, Hkv, D] (G tokens) -> (packed [..., G, Hkv, D*bits/8],
    scale [..., Hkv, D], zero [..., Hkv, D]): per channel over the G tokens. `skip_first`: the
    scales come from tokens 1..G-1 only (token 0 is an attention sink kept in full precision
    elsewhere, kvlab.quant.sink; its codes are clamped to the range and never read)."""
    q, scale, zero = _asymmetric(k, dim=-3, bits=bits, skip_first=skip_first)
    return pack_codes(q, bits), scale.squeeze(-3), zero.squeeze(-3)


def dequantize_keys(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32, bits: int = 4) -> torch.Tensor:
    """(packed [..., G, Hkv, D*bits/8], scale [..., Hkv, D], zero [..., Hkv, D]) -> k [..., G, Hkv, D]."""
    q = unpack_codes(packed, bits).float()
    return (q * scale.float().unsqueeze(-3) + zero.float().unsqueeze(-3)).to(dtype)


def quantize_values(v: torch.Tensor, group: int | None = None, bits: int = 4
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v [..., Hkv, D] -> (packed [..., Hkv, D*bits/8], scale [..., Hkv, D/group],
    zero [..., Hkv, D/group]): per token, per group of `group` consecutive channels."""
    D = v.shape[-1]
    group = value_group(D) if group is None else group
    if D % group:
        raise ValueError(f"head_dim ({D}) must be a multiple of the value group ({group})")
    g = v.unflatten(-1, (D // group, group))  # [..., Hkv, D/group, group]
    q, scale, zero = _asymmetric(g, dim=-1, bits=bits)
    return pack_codes(q.flatten(-2), bits), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_values(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      dtype: torch.dtype = torch.float32, bits: int = 4) -> torch.Tensor:
    """(packed [..., Hkv, D*bits/8], scale and zero [..., Hkv, D/group]) -> v [..., Hkv, D]."""
    q = unpack_codes(packed, bits).float()
    n = scale.shape[-1]
    g = q.unflatten(-1, (n, q.shape[-1] // n))
    return (g * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).flatten(-2).to(dtype)
