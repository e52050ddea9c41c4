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

Sliding-window layers: both attention entry points take `sliding_window=W` (keyword, default None).
A query at cache index p (decode: context_len - 1; prefill: the last q_len indices of its context)
then sees only the keys at indices p - W + 1 .. p, and only the blocks that hold them are gathered
(`window_context`, `sequence_contexts`), so blocks wholly before the window are never read.
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


def window_context(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, sliding_window: int, dtype: torch.dtype):
    """What the decode queries of a windowed layer see: -> k, v [S, L, Hkv, D] (in `dtype`) and
    valid [S, L] (True = attend). Column j of sequence s is its cache index first[s] + j, where
    first[s] starts the block holding index context_len - W; only the blocks from there on are
    gathered (ceil((W - 1) / block_size) + 1 at most), and valid keeps indices
    context_len - W .. context_len - 1."""
    S, M = block_tables.shape
    BS = k_cache.shape[1]
    ctx = context_lens.long().to(block_tables.device)
    first_block = (ctx - sliding_window).clamp(min=0) // BS                             # [S]
    n = min(M, (sliding_window + BS - 2) // BS + 1)
    cols = (first_block.view(S, 1) + torch.arange(n, device=block_tables.device)).clamp(max=M - 1)
    tables = block_tables.gather(1, cols)                                                # [S, n]
    k = gather_blocks(k_cache, tables).to(dtype)
    v = gather_blocks(v_cache, tables).to(dtype)
    L = k.shape[1]
    pos = (first_block * BS).view(S, 1) + torch.arange(L, device=block_tables.device)   # [S, L]
    valid = (pos < ctx.view(S, 1)) & (pos >= ctx.view(S, 1) - sliding_window)
    return k, v, valid.to(k.device)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, *, sliding_window: int | None = None) -> torch.Tensor:
    """One new query per sequence: q [S, Hq, D] attends over its first context_lens[s] tokens.

    The new token's own K/V must already be written (reshape_and_cache), so a query at position
    context_len - 1 sees keys 0 .. context_len - 1: no causal mask is needed, only a length mask.
    `sliding_window` W: only the keys context_len - W .. context_len - 1.
    """
    S, Hq, D = q.shape
    if sliding_window is not None:
        k, v, valid = window_context(k_cache, v_cache, block_tables, context_lens, sliding_window, q.dtype)
        out = F.scaled_dot_product_attention(q.view(S, Hq, 1, D), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=valid.view(S, 1, 1, -1), scale=scale,
                                             enable_gqa=Hq != k.shape[2])
        return out.view(S, Hq, D)
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


def sequence_contexts(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                      sliding_window: int | None = None, min_q_len: int = 1):
    """For each sequence of a packed prefill batch with queries: (start, end, k, v), its rows
    q[start:end] and its whole context's K and V [context_len, Hkv, D] in q's dtype, gathered from
    its blocks (the prefill entry points of every CPU backend walk the batch this way). Sequences
    with fewer than `min_q_len` query rows are skipped (a backend that computed them otherwise).

    With `sliding_window` W, k and v start at the first index its earliest query sees
    (context_len - q_len - W + 1, or 0) and only the blocks from there on are read: the queries are
    still the last q_len rows of k, and differences of positions, all a window mask needs, stay."""
    BS, Hkv, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    qsl, ctx = query_start_loc.tolist(), context_lens.tolist()
    for s in range(len(ctx)):
        start, end, L = qsl[s], qsl[s + 1], ctx[s]
        if end - start < max(min_q_len, 1):
            continue
        lo = 0 if sliding_window is None else max(0, L - (end - start) - sliding_window + 1)
        b0 = lo // BS
        blocks = block_tables[s, b0:(L + BS - 1) // BS].long()
        lo, L = lo - b0 * BS, L - b0 * BS
        k = k_cache.index_select(0, blocks).view(-1, Hkv, D)[lo:L].to(q.dtype)
        v = v_cache.index_select(0, blocks).view(-1, Hkv, D)[lo:L].to(q.dtype)
        yield start, end, k, v


def window_mask(q_len: int, L: int, sliding_window: int | None, device) -> torch.Tensor:
    """[q_len, L] boolean: the last q_len of L positions, each seeing the keys up to itself and,
    with a window W, no further back than W - 1 positions."""
    q_pos = torch.arange(L - q_len, L, device=device).view(q_len, 1)
    k_pos = torch.arange(L, device=device).view(1, L)
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            context_lens: torch.Tensor, scale: float, *,
                            sliding_window: int | None = None) -> torch.Tensor:
    """Packed queries q [N, Hq, D]; sequence s owns rows query_start_loc[s]:query_start_loc[s+1].

    Its q_len queries are the *last* q_len positions of its context: with prefix caching (or a
    decode token mixed into a prefill batch) q_len < context_len, and query i sits at absolute
    position context_len - q_len + i, seeing keys 0 .. that position. One sequence at a time.
    `sliding_window` W: the keys (that position - W + 1) .. that position only.
    """
    N, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.empty_like(q)
    for start, end, k, v in sequence_contexts(q, k_cache, v_cache, block_tables, query_start_loc,
                                              context_lens, sliding_window):
        q_len, L = end - start, k.shape[0]
        qs, ks, vs = q[start:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if sliding_window is not None and q_len > 1 and L > sliding_window:   # the window cuts
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=window_mask(q_len, L, sliding_window,
                                                                                 q.device),
                                               scale=scale, enable_gqa=Hq != Hkv)
        elif q_len == L or q_len == 1:   # a whole prompt (plain causal) or one token (sees all)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=q_len > 1, scale=scale,
                                               enable_gqa=Hq != Hkv)
        else:                            # the last q_len positions over a cached prefix
            q_pos = torch.arange(L - q_len, L, device=q.device).view(q_len, 1)
            mask = torch.arange(L, device=q.device).view(1, L) <= q_pos    # [q_len, L]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                               enable_gqa=Hq != Hkv)       # [Hq, q_len, D]
        out[start:end] = o.transpose(0, 1)
    return out
