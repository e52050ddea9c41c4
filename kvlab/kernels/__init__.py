"""Triton kernels for the paged KV cache, one file per kernel, numbered versions.

Laid out like llm.c's dev/cuda: each version is a complete, readable kernel that adds one idea
to the one before, and every one is checked against the PyTorch reference
(`kvlab.cache.base.causal_attention` over gathered K/V) in tests/test_kernels_*.py.

    reshape_and_cache.py     the cache write: new K/V rows into their slots, quantized on the way
    reshape_and_cache_int4.py  int4 and int2 (KIVI) write: rows into a full-precision residual
                             pool, a block quantized (keys per channel, values per token) when it fills
    decode_attention_v1.py   one program per (sequence, query head), walks the block table
    decode_attention_v2.py   one program per (sequence, KV head): all query heads of a group share
                             each K/V tile (GQA packing) and use tl.dot
    decode_attention_v3.py   split-K "flash-decoding": the context is cut into partitions that
                             run in parallel, then a reduce kernel merges them by log-sum-exp;
                             fused dequantization of int8, fp8, int4 and int2 caches

`kvlab.attention.paged_triton` adapts these to the engine's attention signatures.
Nothing here imports triton at package import time; each module does, when it is used.
"""
