"""Automatic prefix caching in the BlockManager: chained hashes, hits confirmed by content, shared
reference counts, the LRU free queue, cache_salt, and a hypothesis state machine that replays the
engine's call order against a shadow KV memory (which prefix's K/V each slot really holds)."""
import os
import subprocess
import sys

import pytest
from helpers import CallOrderMachine, FakeSeq, check_block_manager
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant

import kvlab.engine.block_manager as bm_module
from kvlab.engine.block_manager import BlockManager
from kvlab.engine.prefix_hash import ROOT, block_hashes, hash_block


# ---- hashing ---------------------------------------------------------------------------------
def test_hashes_are_chained_salted_and_deterministic():
    toks = list(range(8))
    h = block_hashes(toks, 4)
    assert len(h) == 2 and len(block_hashes(toks[:7], 4)) == 1  # partial blocks get no hash
    assert h[0] == hash_block(ROOT, toks[:4]) and h[1] == hash_block(h[0], toks[4:])
    assert block_hashes([9] + toks[1:], 4)[1] != h[1]            # a change early changes every later hash
    assert block_hashes(toks[4:] + toks[4:], 4)[1] != h[1]       # same block tokens, other prefix
    salted = block_hashes(toks, 4, cache_salt="tenant-a")
    assert salted[0] != h[0] and salted[1] != h[1]
    assert block_hashes(toks, 4, cache_salt="tenant-b")[1] != salted[1]
    # fixed values: the same prefix hashes the same in every process and on every machine
    assert h[1].hex().startswith("b0bd05ddc2ecc8ee")
    assert salted[1].hex().startswith("0b7dd0f8ba342f20")
    code = "from kvlab.engine.prefix_hash import block_hashes; print(block_hashes(list(range(8)), 4)[1].hex())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert out == h[1].hex()
    with pytest.raises(TypeError, match="extra hash keys"):
        hash_block(ROOT, [1], (1.5,))


# ---- the block manager ------------------------------------------------------------------------
def test_shared_prefix_is_reused_and_counted():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = FakeSeq(0, list(range(10)))                     # blocks [0..3] [4..7] [8, 9]
    bm.allocate(a)
    assert a.num_cached_tokens == 0 and len(bm.cached) == 2
    b = FakeSeq(1, list(range(8)) + [50, 51, 52])      # shares two full blocks with a
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (21, 8)
    check_block_manager(bm, [a, b])
    bm.deallocate(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    bm.deallocate(b)
    check_block_manager(bm, [])
    assert bm.num_free_blocks == 8 and len(bm.cached) == 2      # contents survive the free


def test_last_prompt_token_is_always_computed():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = FakeSeq(0, list(range(8)))
    bm.allocate(a)
    bm.deallocate(a)
    b = FakeSeq(1, list(range(8)))                     # every block cached, yet one is computed
    bm.allocate(b)
    assert b.num_cached_tokens == 4 < len(b)
    one = FakeSeq(2, list(range(4)))
    bm.allocate(one)
    assert one.num_cached_tokens == 0


def test_lru_free_queue_order_and_eviction():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = FakeSeq(0, [1, 2, 3, 4, 5, 6, 7])             # 3 full blocks + 1 partial
    bm.allocate(a)
    t = list(a.block_table)
    bm.deallocate(a)
    # partial block (no hash) at the head, the full ones at the tail, last block first
    assert list(bm.free_queue) == [t[3], 4, 5, t[2], t[1], t[0]]
    big = FakeSeq(1, list(range(100, 108)))           # takes 4 blocks from the head
    bm.allocate(big)
    assert big.block_table == [t[3], 4, 5, t[2]]
    assert bm.blocks[t[2]].block_hash is not None     # re-registered, for big's own tokens
    assert bm.blocks[t[2]].token_ids == (106, 107)
    bm.deallocate(big)                                # free: [t1, t0, big's 4 blocks reversed]
    c = FakeSeq(2, [1, 2, 3, 4, 9])                   # a's first two blocks are still cached
    bm.allocate(c)
    assert c.num_cached_tokens == 4 and c.block_table[:2] == [t[0], t[1]]
    d = FakeSeq(3, [1, 2, 3, 4, 5, 6, 9])             # a's third block was evicted
    bm.deallocate(c)
    bm.allocate(d)
    assert d.num_cached_tokens == 4
    check_block_manager(bm, [d])


def test_hit_on_free_block_leaves_free_queue():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = FakeSeq(0, [1, 2, 3, 4, 5])
    bm.allocate(a)
    bm.deallocate(a)
    b = FakeSeq(1, [1, 2, 3, 4, 6])                   # needs 3 blocks; 2 are cached hits in the queue
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and bm.num_free_blocks == 0
    c = FakeSeq(2, [7, 8])
    assert not bm.can_allocate(c)                     # a hit on a free block still costs a free block


def test_cache_salt_separates_tenants():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = FakeSeq(0, list(range(9)), cache_salt="alice")
    bm.allocate(a)
    bm.deallocate(a)
    for sid, salt, cached in [(1, "bob", 0), (2, None, 0), (3, "alice", 8)]:
        s = FakeSeq(sid, list(range(9)), cache_salt=salt)
        bm.allocate(s)
        assert s.num_cached_tokens == cached, salt
        bm.deallocate(s)


def test_hash_collision_is_a_miss(monkeypatch):
    """With a hash function that maps everything to one value, no block is ever shared wrongly."""
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, tokens, extra=(): b"same")
    bm = BlockManager(num_blocks=8, block_size=2)
    a = FakeSeq(0, [1, 2, 3])
    bm.allocate(a)
    b = FakeSeq(1, [5, 6, 7])
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and bm.blocks[b.block_table[0]].block_hash is None
    c = FakeSeq(2, [1, 2, 5, 6, 9])                   # block 0 really matches a's; block 1 collides
    bm.allocate(c)
    assert c.num_cached_tokens == 2
    check_block_manager(bm, [a, b, c])


def test_decode_blocks_are_cached_for_the_next_turn():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = FakeSeq(0, [1, 2, 3])
    bm.allocate(a)
    for t in range(10, 17):                           # generate 7 tokens: length 10
        a.token_ids.append(t)
        bm.may_append(a)
    # tokens 0..8 are computed (the newest one is not yet): blocks 0 and 1 are cached
    assert len(bm.cached) == 2 and bm.blocks[a.block_table[1]].token_ids == (11, 12, 13, 14)
    bm.deallocate(a)
    turn2 = FakeSeq(1, [1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 99, 98])
    bm.allocate(turn2)
    assert turn2.num_cached_tokens == 8


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = FakeSeq(0, [1, 2, 3])
    bm.allocate(a)
    assert not bm.reset_prefix_cache()
    bm.deallocate(a)
    assert bm.reset_prefix_cache() and not bm.cached
    b = FakeSeq(1, [1, 2, 3])
    bm.allocate(b)
    assert b.num_cached_tokens == 0


# ---- random workloads -----------------------------------------------------------------------
class PrefixCacheMachine(CallOrderMachine):
    """The block manager under the engine's call order (see CallOrderMachine)."""

    @initialize(num_blocks=st.integers(1, 16), block_size=st.sampled_from([1, 2, 4]))
    def setup(self, num_blocks, block_size):
        self.bs = block_size
        self.start(BlockManager(num_blocks, block_size))
        self.bm = self.cache

    def slot(self, s, p):
        return s.block_table[p // self.bs] * self.bs + p % self.bs

    def check_admitted(self, s):
        assert s.num_cached_tokens % self.bs == 0     # hits are whole blocks

    @invariant()
    def consistent(self):
        if not hasattr(self, "bm"):
            return
        check_block_manager(self.bm, self.running)
        for h, block_id in self.bm.cached.items():   # every hash names the K/V its block holds
            last = self.memory[block_id * self.bs + self.bs - 1]
            salt, prefix = last
            assert len(prefix) % self.bs == 0
            assert block_hashes(list(prefix), self.bs, salt)[-1] == h
            assert self.bm.blocks[block_id].token_ids == prefix[-self.bs:]
            for off in range(self.bs):
                assert self.memory[block_id * self.bs + off] == (salt, prefix[:len(prefix) - self.bs + off + 1])
        assert self.bm.prefix_cache_hits <= self.bm.prefix_cache_queries

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for s in self.running:
            self.bm.deallocate(s)
        assert all(b.ref_count == 0 for b in self.bm.blocks)
        assert sorted(self.bm.free_queue) == list(range(self.bm.num_blocks))
        check_block_manager(self.bm, [])


TestPrefixCacheMachine = PrefixCacheMachine.TestCase
TestPrefixCacheMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
