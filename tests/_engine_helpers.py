"""Shared by the engine's tests: random prompts, greedy sampling, the clean-engine check, and the
block-manager / prefix-cache / radix-cache machinery."""
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

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
