"""Dropping KV entries inside a running sequence: sliding windows, attention sinks, heavy hitters.

`policy` holds the validated settings and the selection rules (which tokens a sequence keeps);
`twin` is a contiguous cache that applies them inside the model, the accuracy twin the benchmark
`benchmarks/kv_eviction.py` measures.
"""
from kvlab.evict.policy import POLICIES, EvictionConfig, select_keep
from kvlab.evict.twin import EvictingKVCache

__all__ = ["POLICIES", "EvictionConfig", "EvictingKVCache", "select_keep"]
