"""Inputs for the graded tests of chapters 06-11: random paged pools, block tables, packed steps.

Tests are graded in a fresh interpreter with only the student's definitions (kvlab/course/grade.py),
so everything a test needs beyond the answer comes from here or from kvlab itself.
"""
from __future__ import annotations

import math

import torch


def scatter_to_blocks(k: torch.Tensor, v: torch.Tensor, num_blocks: int, block_size: int, seed: int):
    """Write contiguous k, v [L, Hkv, D] into randomly chosen blocks of fresh random pools.
    Returns (k_cache, v_cache, block_table); every other slot holds noise."""
    g = torch.Generator().manual_seed(seed)
    L, Hkv, D = k.shape
    table = torch.randperm(num_blocks, generator=g)[:math.ceil(L / block_size)].tolist()
    kc = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(k.dtype)
    vc = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(v.dtype)
    for p in range(L):
        kc[table[p // block_size], p % block_size] = k[p]
        vc[table[p // block_size], p % block_size] = v[p]
    return kc, vc, table


def packed_step(context_lens, q_lens, num_blocks, block_size, num_heads, num_kv_heads, head_dim,
                seed: int, dtype=torch.float32):
    """A random packed step of S sequences over one pool, as the engine hands it to a cache.

    Sequence s has context_lens[s] tokens after this step, of which the last q_lens[s] are new.
    Returns a dict: q [N, Hq, D], k/v [N, Hkv, D] (the new tokens), k_cache/v_cache (the older
    tokens already written, noise elsewhere), slot_mapping [N], query_start_loc [S+1],
    context_lens [S], block_tables [S, M] (padded with -1), and the full per-sequence keys and
    values `keys`, `values` (lists of [L, Hkv, D]) for a reference.
    """
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(L / block_size) for L in context_lens]
    if sum(need) > num_blocks:
        raise ValueError(f"num_blocks={num_blocks} cannot hold {sum(need)} blocks")
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(n)] for n in need]
    kc = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    keys, values, qs, ks, vs, slots, qsl = [], [], [], [], [], [], [0]
    for s, (L, ql) in enumerate(zip(context_lens, q_lens)):
        k = torch.randn(L, num_kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(L, num_kv_heads, head_dim, generator=g).to(dtype)
        keys.append(k)
        values.append(v)
        for p in range(L - ql):
            kc[tables[s][p // block_size], p % block_size] = k[p]
            vc[tables[s][p // block_size], p % block_size] = v[p]
        pos = range(L - ql, L)
        slots += [tables[s][p // block_size] * block_size + p % block_size for p in pos]
        qs.append(torch.randn(ql, num_heads, head_dim, generator=g).to(dtype))
        ks.append(k[L - ql:])
        vs.append(v[L - ql:])
        qsl.append(qsl[-1] + ql)
    width = max(need)
    return dict(q=torch.cat(qs), k=torch.cat(ks), v=torch.cat(vs), k_cache=kc, v_cache=vc,
                slot_mapping=torch.tensor(slots, dtype=torch.int64),
                query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                context_lens=torch.tensor(list(context_lens), dtype=torch.int32),
                block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32),
                keys=keys, values=values, tables=tables)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    """Causal GQA attention in float64 for one sequence: q [q_len, Hq, D] are the last q_len
    positions of k, v [L, Hkv, D]. Returns [q_len, Hq, D] in q's dtype."""
    q_len, Hq, D = q.shape
    L, Hkv = k.shape[0], k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    g = Hq // Hkv
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    q_pos = torch.arange(L - q_len, L).view(-1, 1)
    s = s.masked_fill(torch.arange(L).view(1, -1) > q_pos, float("-inf"))
    p = (s - s.amax(-1, keepdim=True)).exp()
    p = p / p.sum(-1, keepdim=True)
    return torch.einsum("hqk,khd->qhd", p, vv).to(q.dtype)


def replay_schedules(make_scheduler, prompt_lens, output_lens, num_blocks, block_size, max_num_seqs,
                     max_num_batched_tokens, max_steps: int = 500):
    """Drive a scheduler without a model: every scheduled sequence gets one token per step until it
    has output_lens[i] tokens. `make_scheduler(block_manager, max_num_seqs, max_num_batched_tokens)`
    builds it. Returns the steps as (scheduled request ids, preemptions so far, free blocks)."""
    from kvlab.engine.block_manager import BlockManager
    from kvlab.engine.sequence import Sequence

    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    sched = make_scheduler(bm, max_num_seqs, max_num_batched_tokens)
    seqs = [Sequence([1 + i % 7] * n, request_id=f"r{i}") for i, n in enumerate(prompt_lens)]
    for s in seqs:
        sched.add(s)
    want = {s.seq_id: out for s, out in zip(seqs, output_lens)}
    steps = []
    while sched.has_unfinished() and len(steps) < max_steps:
        batch = sched.schedule()
        batch = getattr(batch, "seqs", batch)          # a Schedule (explicit-step engine) or a list
        for s in batch:
            s.num_computed_tokens = len(s)
            s.num_scheduled_tokens = 0
        for s in batch:
            s.append_token(3)
            if s.num_completion_tokens >= want[s.seq_id]:
                sched.finish(s, "length")
        steps.append(([s.request_id for s in batch], sched.num_preemptions, bm.num_free_blocks))
    return steps


def reference_prepare(chunks, block_size: int):
    """The engine's `ModelRunner.prepare` on chunks (`seq`, `start`, `num_tokens`), as plain lists
    in the keys of chapter 11's `prepare_step`."""
    from kvlab.engine.model_runner import ModelRunner

    class _Pool:
        device = "cpu"

    _Pool.block_size = block_size
    try:
        from kvlab.engine.scheduler import ScheduledChunk
        items = [ScheduledChunk(c.seq, c.start, c.num_tokens) for c in chunks]
    except ImportError:                                  # the engine before its explicit step
        for c in chunks:
            c.seq.num_computed_tokens, c.seq.num_scheduled_tokens = c.start, c.num_tokens
        items = [c.seq for c in chunks]
    ids, pos, meta, li = ModelRunner(None, _Pool()).prepare(items)
    return dict(input_ids=ids[0].tolist(), positions=pos[0].tolist(), slot_mapping=meta.slot_mapping.tolist(),
                query_start_loc=meta.query_start_loc.tolist(), context_lens=meta.context_lens.tolist(),
                block_tables=meta.block_tables.tolist(), logit_indices=li.tolist())
