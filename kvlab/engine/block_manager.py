"""The block manager: which physical KV blocks each sequence owns.

The paged cache (kvlab/cache/paged.py) holds `num_blocks` blocks of `block_size` token slots per
layer. This module only does the bookkeeping, never touches a tensor:

- a **free queue** of block ids not referenced by any running sequence;
- a **reference count** per block (how many sequences' block tables point at it);
- a **block table** per sequence (`seq.block_table`): logical block i of the sequence lives in
  physical block `seq.block_table[i]`, so token position p sits in slot
  `block_table[p // block_size] * block_size + p % block_size`.

The design follows vLLM's paged attention (Kwon et al., 2023, "Efficient Memory Management for
Large Language Model Serving with PagedAttention"): a sequence holds only ceil(len / block_size)
blocks, so at most block_size - 1 slots per sequence are wasted.

The engine drives it in this order (see docs/architecture.md and kvlab/engine/scheduler.py):
`can_allocate` / `allocate` when a waiting sequence is admitted; `can_append` / `may_append` before
each decode step, after the sampled token was appended to `seq.token_ids`; `deallocate` when a
sequence finishes, is aborted or is preempted.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Block:
    """One physical block: its id and how many sequences point at it."""
    block_id: int
    ref_count: int = 0


class FreeBlockQueue:
    """Block ids not referenced by any sequence, in the order they should be handed out.

    An OrderedDict gives O(1) pop from the head, push to the tail (or head) and removal of an
    arbitrary id (needed once blocks can be taken back out of the queue, by a prefix-cache hit).
    """

    def __init__(self, block_ids):
        self._q: OrderedDict[int, None] = OrderedDict((b, None) for b in block_ids)

    def __len__(self) -> int:
        return len(self._q)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._q

    def __iter__(self):
        return iter(self._q)

    def popleft(self) -> int:
        if not self._q:
            raise RuntimeError("no free KV blocks left (check can_allocate/can_append first)")
        return self._q.popitem(last=False)[0]

    def peekleft(self) -> int:
        return next(iter(self._q))

    def append(self, block_id: int) -> None:
        self._q[block_id] = None

    def appendleft(self, block_id: int) -> None:
        self._q[block_id] = None
        self._q.move_to_end(block_id, last=False)

    def remove(self, block_id: int) -> None:
        del self._q[block_id]


class BlockManager:
    """Allocate, grow and free the block tables of sequences over a fixed pool of KV blocks.

    A sequence object needs `token_ids` (list[int]), `block_table` (list[int]),
    `num_cached_tokens` (int) and `__len__`; `kvlab.engine.sequence.Sequence` has them.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(range(num_blocks))

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        """Fraction of blocks referenced by at least one sequence (vLLM's kv_cache_usage_perc)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq) -> bool:
        """Are there enough free blocks for all of seq's current tokens?"""
        return self.num_blocks_for(len(seq)) <= len(self.free_queue)

    def can_append(self, seq) -> bool:
        """Is there room for seq's newest token? It needs a fresh block only when the tokens no
        longer fit in the blocks seq already holds (the newest token opened a new block)."""
        need = self.num_blocks_for(len(seq)) - len(seq.block_table)
        return need <= len(self.free_queue)

    # ---- mutations -------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        block_id = self.free_queue.popleft()
        block = self.blocks[block_id]
        assert block.ref_count == 0, f"block {block_id} in the free queue has references"
        block.ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block_id} released more often than it was taken")
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue.append(block_id)

    def allocate(self, seq) -> None:
        """Give seq a block table covering all of its current tokens."""
        if seq.block_table:
            raise ValueError(f"sequence already holds {len(seq.block_table)} blocks; "
                             "deallocate it before allocating again")
        if len(seq) == 0:
            raise ValueError("cannot allocate blocks for an empty sequence")
        need = self.num_blocks_for(len(seq))
        if need > len(self.free_queue):
            raise RuntimeError(f"sequence needs {need} blocks but only {len(self.free_queue)} "
                               "are free (call can_allocate first)")
        seq.block_table.extend(self._take_free_block() for _ in range(need))
        seq.num_cached_tokens = 0

    def may_append(self, seq) -> None:
        """Called after a token was appended to seq: add a block if the tokens outgrew the table."""
        need = self.num_blocks_for(len(seq)) - len(seq.block_table)
        if need < 0:
            raise RuntimeError(f"sequence of {len(seq)} tokens holds {len(seq.block_table)} "
                               "blocks: tokens were removed without deallocating")
        if need > len(self.free_queue):
            raise RuntimeError("no free block for the new token (call can_append first)")
        for _ in range(need):
            seq.block_table.append(self._take_free_block())

    def deallocate(self, seq) -> None:
        """Drop seq's references, last block first, and clear its block table."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table.clear()
        seq.num_cached_tokens = 0
