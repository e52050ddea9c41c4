"""Argument checks shared by the kernel launchers: a bad launch fails here, with the argument's
name and the limit, instead of reading garbage memory on the device."""
from __future__ import annotations

import torch


def check_tensor(name: str, t, *, dtypes=None, ndim=None, shape=None, device=None,
                 contiguous=True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        for i, want in enumerate(shape):
            if want is not None and t.shape[i] != want:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; dimension {i} must be {want}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all operands on one device)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first); "
                         f"got strides {t.stride()} for shape {tuple(t.shape)}")


def check_sink(sink_k, sink_v, sink_slot, *, H: int, D: int, NB: int, dtype, device) -> bool:
    """The attention-sink pool of a cache write or a decode: sink_k, sink_v [R >= 1, H, D] in
    `dtype` and sink_slot int32 [NB], all three or none. Returns whether sinks are on."""
    given = {"sink_k": sink_k, "sink_v": sink_v, "sink_slot": sink_slot}
    if all(t is None for t in given.values()):
        return False
    if any(t is None for t in given.values()):
        missing = ", ".join(n for n, t in given.items() if t is None)
        raise ValueError(f"sink_k, sink_v and sink_slot go together (all three or none); "
                         f"missing {missing}")
    check_tensor("sink_k", sink_k, dtypes=(dtype,), ndim=3, device=device)
    if sink_k.shape[0] < 1 or tuple(sink_k.shape[1:]) != (H, D):
        raise ValueError(f"sink_k (the sink pool) must have shape [R >= 1, {H}, {D}], "
                         f"got {tuple(sink_k.shape)}")
    check_tensor("sink_v", sink_v, dtypes=(dtype,), ndim=3, shape=tuple(sink_k.shape), device=device)
    check_tensor("sink_slot", sink_slot, dtypes=(torch.int32,), ndim=1, shape=(NB,), device=device)
    return True


def check_head_dim(D: int) -> None:
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head dim must be a power of two in [16, 256] (a tile side), got {D}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
