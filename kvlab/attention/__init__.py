"""Paged attention entry points, one module per backend, all with the same three functions.

    reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale)

`paged_torch` is the PyTorch reference (gather by block table, then ordinary attention);
`paged_triton` wraps the Triton kernels of kvlab/kernels/. `backend_module(name)` imports the one
asked for, lazily, so a machine without Triton can still use the torch backend.
"""
from __future__ import annotations

import importlib

BACKENDS = ("torch", "triton")


def backend_module(name: str):
    """The module implementing attention backend `name` ("torch" or "triton")."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise ValueError("attention_backend='triton' needs the `triton` package, which is not "
                             "importable here; use attention_backend='torch'") from e
    return importlib.import_module(f"kvlab.attention.paged_{name}")
