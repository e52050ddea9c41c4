"""The radix-tree prefix cache: token-granular matching, splits, locks, LRU leaf eviction; a
hypothesis state machine against a shadow KV memory; and the engine run on it at block_size=1."""
import copy
import functools

import pytest
import torch
from helpers import CallOrderMachine, FakeSeq
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant

import kvlab
from kvlab import LLM, SamplingParams
from kvlab.engine.radix_cache import RadixCache


def paths(rc: RadixCache):
    """Every node with the full token path from its root to its end."""
    out, stack = [], [(r, ()) for r in rc.roots.values()]
    while stack:
        n, prefix = stack.pop()
        path = prefix + n.key
        if n.parent is not None:
            out.append((n, path))
        stack.extend((c, path) for c in n.children.values())
    return out


def check_consistent(rc: RadixCache, running):
    nodes = [n for n, _ in paths(rc)]
    tree_slots = [s for n in nodes for s in n.slots]
    own = [s for st in rc._seqs.values() for s in st[2]]
    decode = [s for seq in running for s in seq.block_table[rc._seqs[seq.seq_id][1]:]]
    everything = list(rc.free_slots) + tree_slots + own + decode
    assert sorted(everything) == list(range(rc.num_blocks))   # each slot has exactly one owner
    for n in nodes:
        assert len(n.key) == len(n.slots) > 0 and n.parent.children[n.key[0]] is n
        locks = sum(1 for st in rc._seqs.values() if _below(st[0], n))
        assert n.lock_ref == locks
    assert rc.evictable_size == sum(len(n.key) for n in nodes if n.lock_ref == 0)


def _below(node, ancestor):
    while node is not None:
        if node is ancestor:
            return True
        node = node.parent
    return False


def test_token_granular_match_split_and_share():
    rc = RadixCache(64)
    a = FakeSeq(0, [1, 2, 3, 4, 5, 6])
    rc.allocate(a)
    assert a.num_cached_tokens == 0 and len(a.block_table) == 6
    b = FakeSeq(1, [1, 2, 3, 9, 9])                  # shares 3 tokens: no block rounding
    rc.allocate(b)
    assert b.num_cached_tokens == 3 and b.block_table[:3] == a.block_table[:3]
    root = rc.roots[None]
    assert list(root.children[1].key) == [1, 2, 3]   # the edge was split at the divergence
    assert set(root.children[1].children) == {4, 9}
    check_consistent(rc, [a, b])
    c = FakeSeq(2, [1, 2, 3, 4, 5, 6])               # all cached, the last token is recomputed
    rc.allocate(c)
    assert c.num_cached_tokens == 5 and c.block_table[5] != a.block_table[5]
    check_consistent(rc, [a, b, c])
    for s in (a, b, c):
        rc.deallocate(s)
    check_consistent(rc, [])
    assert rc.num_free_blocks + rc.evictable_size == 64
    assert (rc.prefix_cache_queries, rc.prefix_cache_hits) == (17, 8)


def test_decode_tokens_enter_the_tree_at_deallocate():
    rc = RadixCache(32)
    a = FakeSeq(0, [1, 2, 3])
    rc.allocate(a)
    for t in (7, 8, 9):
        a.token_ids.append(t)
        rc.may_append(a)
    rc.deallocate(a)                                  # 1 2 3 7 8 computed, 9 never was
    turn2 = FakeSeq(1, [1, 2, 3, 7, 8, 9, 4])
    rc.allocate(turn2)
    assert turn2.num_cached_tokens == 5


def test_lru_leaf_eviction_and_locks():
    rc = RadixCache(8)
    old, new = FakeSeq(0, [1, 1, 1]), FakeSeq(1, [2, 2, 2])
    rc.allocate(old)
    rc.deallocate(old)
    rc.allocate(new)
    rc.deallocate(new)
    assert rc.num_free_blocks == 2 and rc.evictable_size == 6
    big = FakeSeq(2, [3, 3, 3, 3, 3])                 # needs 3 more slots: evicts the older leaf
    rc.allocate(big)
    assert 1 not in rc.roots[None].children and 2 in rc.roots[None].children
    assert rc.num_evicted_blocks == 3
    locked = FakeSeq(3, [3, 3, 3, 3, 4])              # shares big's locked path
    assert not rc.can_allocate(FakeSeq(4, [5] * 9))
    rc.allocate(locked)
    check_consistent(rc, [big, locked])


def test_cache_salt_and_caching_off():
    rc = RadixCache(32)
    for sid, salt, cached in [(0, "a", 0), (1, "b", 0), (2, "a", 4), (3, None, 0)]:
        s = FakeSeq(sid, [1, 2, 3, 4, 5], cache_salt=salt)
        rc.allocate(s)
        assert s.num_cached_tokens == cached
        rc.deallocate(s)
    off = RadixCache(8, enable_prefix_caching=False)
    for sid in range(3):
        s = FakeSeq(sid, [1, 2, 3, 4, 5])
        off.allocate(s)
        assert s.num_cached_tokens == 0
        off.deallocate(s)
    assert off.num_free_blocks == 8 and not off.roots
    with pytest.raises(ValueError, match="num_slots"):
        RadixCache(0)


class RadixMachine(CallOrderMachine):
    """The radix cache under the engine's call order (see CallOrderMachine): one slot per token."""

    @initialize(num_slots=st.integers(4, 40))
    def setup(self, num_slots):
        self.start(RadixCache(num_slots))
        self.rc = self.cache

    def slot(self, s, p):
        return s.block_table[p]

    def check_admitted(self, s):
        assert len(s) == len(s.block_table)

    @invariant()
    def consistent(self):
        if not hasattr(self, "rc"):
            return
        check_consistent(self.rc, self.running)
        salts = {id(r): salt for salt, r in self.rc.roots.items()}
        for n, path in paths(self.rc):           # every slot in the tree holds its path's K/V
            root = n
            while root.parent is not None:
                root = root.parent
            start = len(path) - len(n.key)
            for i, slot in enumerate(n.slots):
                assert self.memory[slot] == (salts[id(root)], path[:start + i + 1])

    def teardown(self):
        if not hasattr(self, "rc"):
            return
        for s in self.running:
            self.rc.deallocate(s)
        check_consistent(self.rc, [])
        assert all(n.lock_ref == 0 for n, _ in paths(self.rc))
        assert self.rc.num_free_blocks + self.rc.evictable_size == self.rc.num_blocks


TestRadixMachine = RadixMachine.TestCase
TestRadixMachine.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)


def test_engine_runs_on_the_radix_cache(tiny_model):
    """kvlab.LLM at block_size=1 with the radix cache in place of the BlockManager: greedy outputs
    equal the contiguous reference, through sharing, eviction and preemption."""
    model = copy.deepcopy(tiny_model).double()
    ref = functools.lru_cache(maxsize=None)(lambda p, n: tuple(kvlab.generate(model, list(p), n)))
    g = torch.Generator().manual_seed(0)
    system = torch.randint(0, 256, (11,), generator=g).tolist()
    prompts = [system + torch.randint(0, 256, (2 + i % 4,), generator=g).tolist() for i in range(8)]
    llm = LLM(model, num_kv_blocks=48, max_model_len=40, prefix_cache="radix")
    assert isinstance(llm.block_manager, RadixCache) and llm.block_size == 1
    hits = 0
    for batch in (prompts[:4], prompts[4:], prompts[:3]):
        outs = llm.generate(batch, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                            use_tqdm=False)
        for o, p in zip(outs, batch):
            assert tuple(o.outputs[0].token_ids) == ref(tuple(p), 8)
            hits += o.num_cached_tokens
    rc = llm.block_manager
    assert hits > 0 and llm.scheduler.num_preemptions > 0 and rc.num_evicted_blocks > 0
    assert not rc._seqs and rc.num_free_blocks + rc.evictable_size == 48


def _fail_first_forward(llm):
    """The engine's next forward raises once (after its first layer's write), then runs as usual."""
    forward, calls = llm.model.forward, []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the forward failed")
        return forward(*args, **kwargs)
    llm.model.forward = wrapped


def _tree_tokens(rc):
    return sum(len(n.key) for n in rc._nodes())


def test_radix_rolls_back_a_failed_step(model64, reference):
    """Two prompts sharing a prefix, admitted in the step whose forward raises: the tree keeps
    nothing of them (no token is findable without its K/V) and every slot is free again; a
    prompt cached by an earlier step stays cached, only the failed step's extension goes. The
    requests then give the reference's tokens."""
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, model64.config.vocab_size, (12,), generator=g).tolist()
    a, b = base + [5, 6, 7], base + [8, 9]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    llm = LLM(model64, prefix_cache="radix", num_kv_blocks=128, max_model_len=64)
    rc = llm.block_manager
    llm.add_request(a, params, request_id="a")
    llm.add_request(b, params, request_id="b")
    _fail_first_forward(llm)
    try:
        with pytest.raises(RuntimeError, match="forward failed"):
            llm.step()
    finally:
        del llm.model.forward
    assert _tree_tokens(rc) == 0 and rc.num_free_blocks == 128 and rc.evictable_size == 0
    assert rc.lookup(FakeSeq(0, list(a))) == 0
    outs = {}
    while llm.has_unfinished_requests():
        for o in llm.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    assert outs == {"a": reference(a, 3), "b": reference(b, 3)}
    # a computed prompt survives a later failed step that extends it
    cached = _tree_tokens(rc)
    llm.add_request(a + [11, 12, 13, 14], params, request_id="c")
    _fail_first_forward(llm)
    try:
        with pytest.raises(RuntimeError, match="forward failed"):
            llm.step()
    finally:
        del llm.model.forward
    assert _tree_tokens(rc) == cached and rc.lookup(FakeSeq(0, a + [11, 12, 13, 14])) == len(a)
    assert rc.num_free_blocks + cached == 128
    out = llm.generate([a + [11, 12, 13, 14]], params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference(a + [11, 12, 13, 14], 3)
