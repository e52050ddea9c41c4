"""KV caches: the interface the model talks to, and its implementations."""
from kvlab.cache.base import KVCache, NoCache, causal_attention
from kvlab.cache.contiguous import ConcatKVCache, ContiguousKVCache

__all__ = ["KVCache", "NoCache", "causal_attention", "ContiguousKVCache", "ConcatKVCache"]
