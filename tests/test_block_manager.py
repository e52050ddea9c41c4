"""The block manager's bookkeeping, without prefix caching: unit tests and a hypothesis state
machine that runs random allocate / append / deallocate workloads and checks after every step
that reference counts match the block tables, no block is free and held at once, and that
everything is free at the end."""

import pytest
from helpers import FakeSeq, check_block_manager
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvlab.engine.block_manager import BlockManager


def check_consistent(bm, seqs):
    check_block_manager(bm, seqs, full_tables=True)


def test_allocate_append_deallocate():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    s = FakeSeq(0, list(range(5)))                 # 5 tokens -> 2 blocks
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert s.block_table == [0, 1] and bm.num_free_blocks == 2 and bm.usage() == 0.5
    for t in range(3):                             # tokens 6..8 fit in block 1
        s.token_ids.append(t)
        assert bm.can_append(s)
        bm.may_append(s)
    assert len(s.block_table) == 2
    s.token_ids.append(9)                          # token 9 opens block 3
    bm.may_append(s)
    assert s.block_table == [0, 1, 2]
    bm.deallocate(s)
    assert s.block_table == [] and bm.num_free_blocks == 4 and bm.usage() == 0.0
    # uncached blocks hold nothing worth keeping: they go back to the head, to be reused first
    assert list(bm.free_queue) == [0, 1, 2, 3]


def test_out_of_blocks_is_refused():
    bm = BlockManager(num_blocks=2, block_size=4, enable_prefix_caching=False)
    big = FakeSeq(0, list(range(9)))               # needs 3 blocks
    assert not bm.can_allocate(big)
    with pytest.raises(RuntimeError, match="can_allocate"):
        bm.allocate(big)
    assert bm.num_free_blocks == 2                 # nothing leaked by the refusal
    s = FakeSeq(1, list(range(8)))
    bm.allocate(s)
    s.token_ids.append(0)
    assert not bm.can_append(s)
    with pytest.raises(RuntimeError, match="can_append"):
        bm.may_append(s)


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(8, 12)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    bm = BlockManager(4, 4)
    s = FakeSeq(0, [1, 2])
    bm.allocate(s)
    with pytest.raises(ValueError, match="deallocate"):
        bm.allocate(s)
    with pytest.raises(ValueError, match="empty"):
        bm.allocate(FakeSeq(1, []))


class BlockManagerMachine(RuleBasedStateMachine):
    """Random workloads against a small pool; the scheduler's rules (admit only if can_allocate,
    preempt when can_append fails) are played by the rules' preconditions."""

    @initialize(num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 4, 8]))
    def setup(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.running: list[FakeSeq] = []
        self.next_id = 0

    @rule(n=st.integers(1, 40))
    def admit(self, n):
        s = FakeSeq(self.next_id, list(range(n)))
        self.next_id += 1
        if self.bm.can_allocate(s):
            self.bm.allocate(s)
            assert len(s.block_table) == self.bm.num_blocks_for(n)
            assert s.num_cached_tokens == 0
            self.running.append(s)
        else:
            assert self.bm.num_blocks_for(n) > self.bm.num_free_blocks

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100))
    def decode(self, i):
        s = self.running[i % len(self.running)]
        s.token_ids.append(7)
        while not self.bm.can_append(s):           # preempt the newest other sequence, or self
            victim = self.running.pop()
            self.bm.deallocate(victim)
            if victim is s:
                return
        self.bm.may_append(s)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100))
    def finish(self, i):
        s = self.running.pop(i % len(self.running))
        self.bm.deallocate(s)
        assert s.block_table == []

    @invariant()
    def consistent(self):
        if hasattr(self, "bm"):
            check_consistent(self.bm, self.running)

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for s in self.running:
            self.bm.deallocate(s)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
