"""Moved: the quantized paged cache is a cache, `kvlab.cache.quantized` (kvlab.quant holds the
formats only, so kvlab.quant imports neither kvlab.attention nor kvlab.cache's paged caches).
This path re-exports it lazily while the chapters move to the new one."""


def __getattr__(name):
    import kvlab.cache.quantized as moved

    return getattr(moved, name)
