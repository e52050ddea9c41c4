"""int8 KV cache: symmetric, one scale per token per KV head.

Each token's key (or value) vector of one KV head, `D` numbers, shares one scale
`s = amax / 127` (amax = its largest magnitude), and is stored as `q = round(x / s)` in int8,
`x ~= q * s`. The rounding error of every element is at most `s / 2`: small against the row's
largest element, which is why per-token scales cope with tokens of very different norms (an
"attention sink" token next to ordinary ones). The scale is stored as float16 (2 bytes), so a
token of one head costs `D + 2` bytes instead of `2 D` in bfloat16: 1.94x the tokens for D = 64.

The same scheme is ZeroQuant's token-wise quantization (Yao et al., 2022, "ZeroQuant: Efficient and
Affordable Post-Training Quantization for Large-Scale Transformers") applied to the cache, and what
vLLM calls a per-token int8 KV cache.
"""
from __future__ import annotations

import torch

from kvlab.quant.common import check_finite, round_up_fp16

QMAX = 127
#: The smallest stored scale: float16's smallest normal number. Rows whose amax / 127 is below it
#: (all-zero rows included) use it, so a scale is never zero and never subnormal.
MIN_SCALE = float(torch.finfo(torch.float16).tiny)
#: float16 scales hold amax up to 65504 * 127.
MAX_ABS = float(torch.finfo(torch.float16).max) * QMAX * 0.999


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (float) -> (q int8 [..., D], scale float16 [...]) with x ~= q * scale."""
    check_finite(x, "x")
    amax = x.float().abs().amax(dim=-1)
    if amax.numel() and float(amax.max()) > MAX_ABS:
        raise ValueError(f"x has magnitude {float(amax.max()):.3g}; int8 with float16 scales holds "
                         f"at most {MAX_ABS:.3g}")
    scale = round_up_fp16((amax / QMAX).clamp_min(MIN_SCALE))
    q = torch.round(x.float() / scale.float().unsqueeze(-1)).clamp_(-QMAX, QMAX)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q int8 [..., D], scale [...]) -> x [..., D] in `dtype`."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)
