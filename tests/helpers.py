"""Helpers shared by the tests, in one place (no test file keeps its own copy):

- engines: `GREEDY`, `random_prompts`, `assert_all_free`, `FakeSeq`, `CallOrderMachine` (the engine's
  call order against a prefix cache), `check_block_manager` (reference counts and free queue);
- models: `random_llama` (a small random Llama, float64 by default);
- paged attention and kernels: `DEVICE`, `random_paged`, `gather`, `reference_decode` (float64),
  `rel_err`, `scale_for`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from kvlab.cache.base import causal_attention
from kvlab.model.config import LlamaConfig
from kvlab.model.llama import Llama

#: SamplingParams keywords of a greedy request that runs to max_tokens
GREEDY = dict(temperature=0, ignore_eos=True)


def random_prompts(lengths, seed=0, vocab=256, shared=0):
    """One random prompt per length, seeded; `shared` tokens in front of every one of them."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, vocab, (shared,), generator=g).tolist()
    return [head + torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def assert_all_free(llm):
    """Nothing held: every block free, every reference count zero, no request left."""
    bm = llm.block_manager
    assert bm.num_free_blocks == llm.num_kv_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not llm.has_unfinished_requests()


@dataclass
class FakeSeq:
    """The smallest object the block managers accept (the real one is kvlab.engine.sequence)."""
    seq_id: int
    token_ids: list
    cache_salt: str | None = None
    block_table: list = field(default_factory=list)
    num_cached_tokens: int = 0

    def __len__(self):
        return len(self.token_ids)


class CallOrderMachine(RuleBasedStateMachine):
    """The engine's order of calls to a prefix cache (admit, decode with preemption by recompute,
    finish, abort) against a shadow memory: `memory[slot]` is (salt, prefix) of the token whose K/V
    were last written to that slot; the K/V of position p depend on tokens[:p + 1]. Every prefix-cache
    hit must find exactly the right K/V in memory.

    The block manager (tests/test_prefix_caching.py) and the radix cache (tests/test_radix_cache.py)
    run these same rules; each subclass builds its cache in an @initialize rule with `start(cache)`,
    says where token p of a sequence lives (`slot`), and adds its own invariants."""

    SYSTEM_PROMPTS = [[], [5, 6, 7, 8, 9], [5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7], list(range(20, 40))]

    def start(self, cache):
        self.cache = cache
        self.running: list[FakeSeq] = []
        self.waiting: list[FakeSeq] = []              # preempted, re-admitted first
        self.memory: dict[int, tuple] = {}
        self.next_id = 0

    def slot(self, s, p: int) -> int:
        raise NotImplementedError

    def check_admitted(self, s) -> None:
        """What the cache promises about a sequence it has just allocated."""

    def compute(self, s, start, stop):
        for p in range(start, stop):
            self.memory[self.slot(s, p)] = (s.cache_salt, tuple(s.token_ids[:p + 1]))

    def admit(self, s):
        if not self.cache.can_allocate(s):
            return False
        self.cache.allocate(s)
        assert 0 <= s.num_cached_tokens < len(s)
        self.check_admitted(s)
        for p in range(s.num_cached_tokens):          # the hit really holds this prefix's K/V
            assert self.memory.get(self.slot(s, p)) == (s.cache_salt, tuple(s.token_ids[:p + 1]))
        self.compute(s, s.num_cached_tokens, len(s))  # the prefill
        s.token_ids.append(len(s) % 3)                # the first sampled token (not yet computed)
        self.running.append(s)
        return True

    @rule(system=st.sampled_from(range(len(SYSTEM_PROMPTS))),
          suffix=st.lists(st.integers(0, 2), min_size=1, max_size=8),
          salt=st.sampled_from([None, None, "t1"]))
    def new_request(self, system, suffix, salt):
        s = FakeSeq(self.next_id, self.SYSTEM_PROMPTS[system] + suffix, cache_salt=salt)
        self.next_id += 1
        self.admit(s)                                 # not admitted = rejected, nothing held

    @precondition(lambda self: self.waiting)
    @rule()
    def readmit_preempted(self):
        if self.admit(self.waiting[0]):
            self.waiting.pop(0)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100), token=st.integers(0, 2))
    def decode(self, i, token):
        s = self.running[i % len(self.running)]
        while not self.cache.can_append(s):           # preempt the newest sequence, maybe s itself
            victim = self.running.pop()
            self.cache.deallocate(victim)
            self.waiting.insert(0, victim)
            if victim is s:
                return
        self.cache.may_append(s)
        self.compute(s, len(s) - 1, len(s))           # the decode step writes the newest token
        s.token_ids.append(token)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100))
    def finish_or_abort(self, i):
        s = self.running.pop(i % len(self.running))
        self.cache.deallocate(s)
        assert s.block_table == []

    @precondition(lambda self: self.waiting)
    @rule()
    def abort_waiting(self):
        self.waiting.pop()



# ---- paged attention and kernels -------------------------------------------------------------
# On a GPU run (pytest --gpu, TRITON_INTERPRET unset) the kernels run on CUDA; otherwise on the CPU
# in Triton's interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
                      else "cpu")


def random_paged(lens, Hkv, D, BS, dtype=torch.float32, spare_blocks=3, seed=0):
    """K/V caches [NB, BS, Hkv, D] filled with random numbers, a block table that scatters each
    sequence over shuffled blocks (-1 padded), and context lengths."""
    g = torch.Generator().manual_seed(seed)
    need = [(n + BS - 1) // BS for n in lens]
    NB = sum(need) + spare_blocks
    M = max(max(need), 1) + 1                                   # one extra -1 column
    k = torch.randn(NB, BS, Hkv, D, generator=g).to(dtype)
    v = torch.randn(NB, BS, Hkv, D, generator=g).to(dtype)
    perm = torch.randperm(NB, generator=g)
    bt = torch.full((len(lens), M), -1, dtype=torch.int32)
    used = 0
    for s, nb in enumerate(need):
        bt[s, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    ctx = torch.tensor(lens, dtype=torch.int32)
    return k.to(DEVICE), v.to(DEVICE), bt.to(DEVICE), ctx.to(DEVICE)


def gather(cache, bt_row, n):
    BS = cache.shape[1]
    blocks = bt_row[: (n + BS - 1) // BS].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:n]     # [n, Hkv, D]


def reference_decode(q, k, v, bt, ctx):
    """float64 decode attention: each sequence's one query over its gathered context."""
    out = []
    for s, n in enumerate(ctx.tolist()):
        ks = gather(k, bt[s], n).double().unsqueeze(0)
        vs = gather(v, bt[s], n).double().unsqueeze(0)
        out.append(causal_attention(q[s:s + 1].double().unsqueeze(0), ks, vs, q_offset=n - 1)[0, 0])
    return torch.stack(out)


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "output has NaN: some element was not written"
    return ((out.double() - ref).norm() / ref.norm()).item()


def scale_for(D):
    return 1.0 / math.sqrt(D)        # causal_attention's scale


# ---- models ----------------------------------------------------------------------------------
def random_llama(seed: int = 0, dtype: torch.dtype = torch.float64, tie: bool = True,
                 num_layers: int = 3, max_position_embeddings: int = 256, **config) -> Llama:
    """A small Llama (vocab 96, hidden 48, 6 query and 2 KV heads of 8) with random weights large
    enough that every layer matters; `config` overrides LlamaConfig fields."""
    cfg = LlamaConfig(**dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=num_layers,
                             num_heads=6, num_kv_heads=2, head_dim=8, rope_theta=5000.0,
                             max_position_embeddings=max_position_embeddings,
                             tie_word_embeddings=tie) | config)
    torch.manual_seed(seed)
    m = Llama(cfg).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    return m.to(dtype)


# ---- the block manager -------------------------------------------------------------------------
def check_block_manager(bm, seqs, full_tables: bool = False) -> None:
    """Reference counts equal the number of block tables pointing at each block; the free queue
    holds exactly the unreferenced blocks, each once; the hash map and the blocks' own hashes
    agree. `full_tables`: every non-empty table covers exactly its sequence's tokens."""
    counts = [0] * bm.num_blocks
    for s in seqs:
        if full_tables:
            assert len(s.block_table) == bm.num_blocks_for(len(s)) or not s.block_table
        for b in s.block_table:
            counts[b] += 1
    assert [b.ref_count for b in bm.blocks] == counts
    free = list(bm.free_queue)
    assert len(free) == len(set(free)) == bm.num_free_blocks
    assert set(free) == {i for i, c in enumerate(counts) if c == 0}
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].block_hash == h
    assert sum(b.block_hash is not None for b in bm.blocks) == len(bm.cached)
