"""Chained block hashes: the keys of automatic prefix caching.

The keys and values of token i depend on every token before it, so a block of K/V can be reused
only by a sequence whose *whole prefix* up to the end of that block is the same. Hashing each
full block together with its parent block's hash gives a key that names the whole prefix in a
fixed size (the scheme of vLLM's automatic prefix caching; Kwon et al., 2023, "Efficient Memory
Management for Large Language Model Serving with PagedAttention"):

    h_0 = H(ROOT, tokens[0:B],  extra keys)       # B = block_size
    h_i = H(h_{i-1}, tokens[iB:(i+1)B])

Extra keys enter the first block, so the chain carries them into every later hash. kvlab uses
one: the request's `cache_salt`. Two requests with different salts never share a block, so one
tenant cannot learn from time-to-first-token whether another tenant's prompt is in the cache.

H is SHA-256 over a fixed byte encoding (little-endian int64 tokens, length-prefixed keys), so the
same prefix gets the same hash in every process and on every machine; Python's built-in `hash()`
is salted per process and would not be. Only full blocks are hashed: a partly filled block is
still being written and cannot be shared.
"""
from __future__ import annotations

import hashlib
import struct

ROOT = bytes(32)  # the parent "hash" of a sequence's first block


def _encode_key(key) -> bytes:
    if isinstance(key, str):
        data, tag = key.encode("utf-8"), b"s"
    elif isinstance(key, bytes):
        data, tag = key, b"b"
    elif isinstance(key, int) and not isinstance(key, bool):
        data, tag = key.to_bytes(16, "little", signed=True), b"i"
    else:
        raise TypeError(f"extra hash keys must be str, bytes or int, got {type(key).__name__}")
    return tag + struct.pack("<Q", len(data)) + data


def hash_block(parent: bytes, token_ids, extra_keys: tuple = ()) -> bytes:
    """SHA-256 of (parent hash, the block's token ids, extra keys): 32 bytes."""
    h = hashlib.sha256(parent)
    h.update(struct.pack(f"<Q{len(token_ids)}q", len(token_ids), *token_ids))
    for key in extra_keys:
        h.update(_encode_key(key))
    return h.digest()


def extra_keys_for(cache_salt: str | None) -> tuple:
    """The extra keys of a request's first block."""
    return () if cache_salt is None else (cache_salt,)


def block_hashes(token_ids, block_size: int, cache_salt: str | None = None) -> list[bytes]:
    """The chained hashes of every full block of `token_ids` (a trailing partial block has none)."""
    hashes, parent = [], ROOT
    for i in range(len(token_ids) // block_size):
        extra = extra_keys_for(cache_salt) if i == 0 else ()
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], extra)
        hashes.append(parent)
    return hashes
