"""Paged attention entry points, one module per backend, all with the same three functions.

    reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale)

`paged_torch` is the PyTorch reference (gather by block table, then ordinary attention);
`paged_cpu` computes the same on the CPU's fused attention kernel (grouped query rows, 4-D
prompts: faster in bfloat16 and for prompts, tested equal to the reference); `paged_triton` wraps
the Triton kernels of kvlab/kernels/. `backend_module(name)` imports the one
asked for, lazily, so a machine without Triton can still use the torch backend; an object with
the three functions (a student's backend) is used as it is.

Sliding-window layers: every backend here takes the keyword `sliding_window=W` on both attention
entry points (`accepts_sliding_window` asks an object whether it does).
"""
from __future__ import annotations

import importlib
import inspect

BACKENDS = ("torch", "cpu", "triton")


def backend_module(name):
    """The module implementing attention backend `name` ("torch", "cpu" or "triton"); an object with the
    three functions above (kvlab/engine/protocols.py, `AttentionBackend`) is returned as it is."""
    if not isinstance(name, str):
        missing = [f for f in ("reshape_and_cache", "paged_decode_attention", "paged_prefill_attention")
                   if not callable(getattr(name, f, None))]
        if missing:
            raise ValueError(f"attention_backend must be one of {BACKENDS} or an object with "
                             f"reshape_and_cache, paged_decode_attention and paged_prefill_attention; "
                             f"{type(name).__name__} lacks {', '.join(missing)}")
        return name
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise ValueError("attention_backend='triton' needs the `triton` package, which is not "
                             "importable here; use attention_backend='torch'") from e
    return importlib.import_module(f"kvlab.attention.paged_{name}")


def accepts_sliding_window(ops) -> bool:
    """Whether both attention entry points of a backend module or object take `sliding_window=`
    (by name or through **kwargs): the paged cache passes it for windowed layers only."""
    for name in ("paged_decode_attention", "paged_prefill_attention"):
        try:
            params = inspect.signature(getattr(ops, name)).parameters.values()
        except (TypeError, ValueError):   # a builtin without a signature: assume it does not
            return False
        if not any(p.name == "sliding_window" or p.kind is p.VAR_KEYWORD for p in params):
            return False
    return True
