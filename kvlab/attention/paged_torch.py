"""Paged attention in plain PyTorch: the reference every paged kernel is checked against.

The paged cache (docs/architecture.md, section 3) keeps, per layer, `k_cache` and `v_cache` of
shape [num_blocks, block_size, Hkv, D]. A sequence's tokens live in the blocks its block table
names, in order: token p sits in block `block_table[p // block_size]` at offset `p % block_size`.
This is the layout of vLLM's PagedAttention (Kwon et al., 2023, "Efficient Memory Management for
Large Language Model Serving with PagedAttention").

The reference strategy is the simplest correct one: *gather* each sequence's blocks back into a
contiguous [context_len, Hkv, D] tensor, then run ordinary causal attention. A real kernel never
materialises that copy; it walks the block table and reads one block at a time (see
kvlab/kernels/). Three entry points, the same for every backend:

    reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)           # write new K/V to slots
    paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write k, v [N, Hkv, D] into the flat slots `slot_mapping` [N] of the block pools.

    Slot s is block s // block_size, offset s % block_size; viewing the pool [NB, BS, Hkv, D] as
    [NB * BS, Hkv, D] turns the write into one indexed copy. Slots < 0 are padding and skipped.
    """
    NB, BS, Hkv, D = k_cache.shape
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(NB * BS, Hkv, D).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(NB * BS, Hkv, D).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[NB, BS, Hkv, D] pool, [S, M] block tables -> [S, M * BS, Hkv, D] contiguous copies.

    Padding entries (-1) read block 0; callers mask those positions with the context length.
    (`index_select` on the flattened table: on CPU it is much faster than 2-D fancy indexing.)
    """
    S, M = block_tables.shape
    NB, BS, Hkv, D = cache.shape
    flat = block_tables.reshape(-1).clamp(min=0).long()
    return cache.index_select(0, flat).view(S, M * BS, Hkv, D)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One new query per sequence: q [S, Hq, D] attends over its first context_lens[s] tokens.

    The new token's own K/V must already be written (reshape_and_cache), so a query at position
    context_len - 1 sees keys 0 .. context_len - 1: no causal mask is needed, only a length mask.
    """
    S, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    k = gather_blocks(k_cache, block_tables).to(q.dtype)   # [S, L, Hkv, D]
    v = gather_blocks(v_cache, block_tables).to(q.dtype)
    L = k.shape[1]
    mask = None
    if S == 1:                                               # one sequence: cut, no mask needed
        n = int(context_lens[0])
        k, v = k[:, :n], v[:, :n]
    else:
        valid = torch.arange(L, device=q.device).view(1, L) < context_lens.view(S, 1).to(q.device)
        mask = valid.view(S, 1, 1, L)                        # [S, heads, q, keys]
    out = F.scaled_dot_product_attention(q.view(S, Hq, 1, D), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
    return out.view(S, Hq, D)


def sequence_contexts(q, k_cache, v_cache, block_tables, query_start_loc, context_lens):
    """For each sequence of a packed prefill batch with queries: (start, end, k, v), its rows
    q[start:end] and its whole context's K and V [context_len, Hkv, D] in q's dtype, gathered from
    its blocks (the prefill entry points of every CPU backend walk the batch this way)."""
    BS, Hkv, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    qsl, ctx = query_start_loc.tolist(), context_lens.tolist()
    for s in range(len(ctx)):
        start, end, L = qsl[s], qsl[s + 1], ctx[s]
        if end == start:
            continue
        blocks = block_tables[s, :(L + BS - 1) // BS].long()
        k = k_cache.index_select(0, blocks).view(-1, Hkv, D)[:L].to(q.dtype)
        v = v_cache.index_select(0, blocks).view(-1, Hkv, D)[:L].to(q.dtype)
        yield start, end, k, v


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Packed queries q [N, Hq, D]; sequence s owns rows query_start_loc[s]:query_start_loc[s+1].

    Its q_len queries are the *last* q_len positions of its context: with prefix caching (or a
    decode token mixed into a prefill batch) q_len < context_len, and query i sits at absolute
    position context_len - q_len + i, seeing keys 0 .. that position. One sequence at a time.
    """
    N, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.empty_like(q)
    for start, end, k, v in sequence_contexts(q, k_cache, v_cache, block_tables, query_start_loc, context_lens):
        q_len, L = end - start, k.shape[0]
        qs, ks, vs = q[start:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if q_len == L or q_len == 1:     # a whole prompt (plain causal) or one token (sees all)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=q_len > 1, scale=scale,
                                               enable_gqa=Hq != Hkv)
        else:                            # the last q_len positions over a cached prefix
            q_pos = torch.arange(L - q_len, L, device=q.device).view(q_len, 1)
            mask = torch.arange(L, device=q.device).view(1, L) <= q_pos    # [q_len, L]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                               enable_gqa=Hq != Hkv)       # [Hq, q_len, D]
        out[start:end] = o.transpose(0, 1)
    return out
