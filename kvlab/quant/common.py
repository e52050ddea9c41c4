"""What every KV-cache format shares: the list of valid names and the input checks."""
from __future__ import annotations

import torch

#: Valid values of `kv_cache_dtype`. "auto" stores K and V in the model's dtype.
KV_CACHE_DTYPES = ("auto", "int8", "fp8", "int4", "int2")

#: Tokens per paged block when none is given, per format (kvlab.LLM and the byte counts agree).
#: int4 quantizes a block's keys per channel over its tokens, so its float16 scale and zero per
#: channel cost 4D bytes per block; blocks of 32 halve that per token (3.2x bfloat16's capacity at
#: head_dim 64 instead of 2.9x); int2 likewise.
DEFAULT_BLOCK_SIZE = {"auto": 16, "int8": 16, "fp8": 16, "int4": 32, "int2": 32}


def check_kv_cache_dtype(kv_cache_dtype: str) -> str:
    """Return `kv_cache_dtype` if it is valid, else raise a ValueError that lists the valid ones."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}; "
                         f"got {kv_cache_dtype!r}")
    return kv_cache_dtype


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    """Quantizers derive scales from min/max: one inf or nan would poison a whole group, so refuse."""
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} has {bad} non-finite value(s) (inf or nan); a KV cache can only "
                         "quantize finite keys and values")


def round_up_fp16(s: torch.Tensor) -> torch.Tensor:
    """`s` (float32) stored as float16, rounded *up* (towards +inf).

    Used for scales: rounding a scale down would push the largest value one step past the top code
    and force a clamp; rounding up costs at most one part in 2**10 of resolution.
    """
    s16 = s.to(torch.float16)
    low = s16.float() < s
    return torch.where(low, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)


def round_down_fp16(z: torch.Tensor) -> torch.Tensor:
    """`z` (float32) stored as float16, rounded *down* (towards -inf): a zero point (a minimum)
    that stays at or below every value of its group, so no value falls under code 0."""
    z16 = z.to(torch.float16)
    high = z16.float() > z
    return torch.where(high, torch.nextafter(z16, torch.full_like(z16, float("-inf"))), z16)
