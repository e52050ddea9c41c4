"""The block manager: which physical KV blocks each sequence owns, and which can be shared.

The paged cache (kvlab/cache/paged.py) holds `num_blocks` blocks of `block_size` token slots per
layer. This module only does the bookkeeping and never touches a tensor:

- a **free queue** of block ids that no running sequence references;
- a **reference count** per block (how many sequences' block tables point at it);
- a **block table** per sequence (`seq.block_table`): logical block i of the sequence lives in
  physical block `seq.block_table[i]`, so token position p sits in slot
  `block_table[p // block_size] * block_size + p % block_size`.

A sequence holds ceil(len / block_size) blocks, so at most block_size - 1 slots per sequence are
wasted (Kwon et al., 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention").

**Automatic prefix caching** (`enable_prefix_caching=True`, vLLM's default) lets sequences that
start with the same tokens share the blocks of that prefix:

- every full block is named by a chained hash (kvlab/engine/prefix_hash.py) and registered in a
  hash -> block map;
- on admission the longest run of cached blocks matching the prompt is reused (reference count
  + 1) and only the rest is prefilled; `seq.num_cached_tokens` says how many tokens were found. It
  stays below len(seq): the last prompt token is always computed, so the first output has logits;
- a hit is *confirmed* against what the block stores: its token ids, its extra keys, and the
  exact block (id and generation) it was computed on top of. A hash collision therefore shows up
  as a miss; it can never hand back another prompt's keys and values;
- when a block's count drops to zero it keeps its contents and its hash and joins the *tail* of
  the free queue (a sequence's blocks in reverse order, so its last block is reused first). New
  blocks come from the *head*, and taking a cached block from there evicts its hash: the free
  queue is an LRU list of evictable cached blocks. A block with nothing worth keeping (no hash)
  goes to the head instead. A hit on a free cached block pulls it out of the queue in O(1).

The engine drives it in this order: `can_allocate` / `allocate` when a waiting sequence is admitted
(its whole prompt is prefilled from `num_cached_tokens` on in that step); `can_append` /
`may_append` before each decode step, after the sampled token was appended to `seq.token_ids`;
`deallocate` when a sequence finishes, is aborted or is preempted.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvlab.engine.prefix_hash import ROOT, extra_keys_for, hash_block


@dataclass
class Block:
    """One physical block. `generation` counts how often its contents were replaced; (block_id,
    generation) names one particular content and is how a child block records its parent."""
    block_id: int
    ref_count: int = 0
    generation: int = 0
    block_hash: bytes | None = None      # set while registered in the prefix cache
    token_ids: tuple = ()                # the tokens whose K/V it holds (when registered)
    parent: tuple | None = None          # (block_id, generation) of the block before it
    extra_keys: tuple = ()               # cache_salt, for a sequence's first block

    @property
    def ref(self) -> tuple:
        return (self.block_id, self.generation)


class FreeBlockQueue:
    """Unreferenced block ids, head = next to hand out. An OrderedDict gives O(1) pop from the
    head, push to either end, and removal from the middle (a prefix-cache hit on a free block)."""

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

    def append(self, block_id: int) -> None:
        self._q[block_id] = None

    def appendleft(self, block_id: int) -> None:
        self._q[block_id] = None
        self._q.move_to_end(block_id, last=False)

    def remove(self, block_id: int) -> None:
        del self._q[block_id]


class BlockManager:
    """Allocate, grow, share and free the block tables of sequences over a fixed pool of blocks.

    A sequence needs `seq_id`, `token_ids`, `block_table`, `num_cached_tokens`, `cache_salt` and
    `__len__`; `kvlab.engine.sequence.Sequence` has them. Counters, in tokens, named like vLLM's:
    `prefix_cache_queries` (prompt tokens looked up) and `prefix_cache_hits` (tokens found);
    `num_evicted_blocks` counts cached blocks whose contents were dropped for new ones.

    `on_discard(block_id)`, if given, is called when a block's contents are dropped: freed with
    no prefix-cache hash (nobody can find them again), or evicted from the prefix cache. A cache
    that keeps per-block state outside its pool (int4's full-precision residual rows,
    kvlab/quant/residual.py; sink rows, kvlab/quant/sink.py) lets it go there.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 on_discard=None):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.on_discard = on_discard
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(range(num_blocks))
        self.cached: dict[bytes, int] = {}                    # block hash -> block id
        self._chains: dict[int, list[tuple[bytes, tuple]]] = {}  # seq_id -> (hash, ref) per hashed block
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_evicted_blocks = 0                           # cached blocks reused for new contents

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        """Fraction of blocks referenced by at least one sequence (vLLM's kv_cache_usage_perc)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq) -> bool:
        """Are there enough free blocks for all of seq's current tokens? Cached blocks another
        sequence is using cost nothing; cached blocks sitting in the free queue still do."""
        hits = self._cached_prefix(seq)
        need = self.num_blocks_for(len(seq)) - sum(b.ref_count > 0 for b in hits)
        return need <= len(self.free_queue)

    def can_append(self, seq) -> bool:
        """Is there room for seq's newest token? It needs a fresh block only when the tokens no
        longer fit in the blocks seq already holds (the newest token opened a new block)."""
        return self.num_blocks_for(len(seq)) - len(seq.block_table) <= len(self.free_queue)

    # ---- the prefix cache ------------------------------------------------------------------
    def _block_key(self, seq, i: int, parent_hash: bytes):
        tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
        extra = extra_keys_for(seq.cache_salt) if i == 0 else ()
        return hash_block(parent_hash, tokens, extra), tokens, extra

    def _cached_prefix(self, seq) -> list[Block]:
        """The longest chain of cached blocks matching seq's first full blocks, leaving at least
        the last token to compute. Pure: changes nothing."""
        if not self.enable_prefix_caching:
            return []
        hits: list[Block] = []
        parent_hash, parent_ref = ROOT, None
        for i in range((len(seq) - 1) // self.block_size):
            h, tokens, extra = self._block_key(seq, i, parent_hash)
            block_id = self.cached.get(h)
            if block_id is None:
                break
            b = self.blocks[block_id]
            if (b.token_ids, b.extra_keys, b.parent) != (tokens, extra, parent_ref):
                break                                  # a hash collision or a stale child: a miss
            hits.append(b)
            parent_hash, parent_ref = h, b.ref
        return hits

    def _register(self, block: Block, h: bytes, tokens: tuple, parent_ref, extra) -> tuple:
        """Enter a freshly computed full block into the cache; return the ref its child should
        record as parent. If the same content is already cached under h (this sequence computed a
        copy), the cached copy stays the canonical one and children hang under it."""
        other_id = self.cached.get(h)
        if other_id is None:
            block.block_hash, block.token_ids = h, tokens
            block.parent, block.extra_keys = parent_ref, extra
            self.cached[h] = block.block_id
            return block.ref
        other = self.blocks[other_id]
        if (other.token_ids, other.extra_keys, other.parent) == (tokens, extra, parent_ref):
            return other.ref
        return block.ref                               # a collision: this block stays uncached

    def _register_full_blocks(self, seq, num_computed: int) -> None:
        """Hash every block of seq whose tokens are all computed and that has no hash yet."""
        chain = self._chains.setdefault(seq.seq_id, [])
        while len(chain) < num_computed // self.block_size:
            i = len(chain)
            parent_hash, parent_ref = chain[-1] if chain else (ROOT, None)
            h, tokens, extra = self._block_key(seq, i, parent_hash)
            chain.append((h, self._register(self.blocks[seq.block_table[i]], h, tokens,
                                            parent_ref, extra)))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block. Only while no sequence holds blocks; returns success."""
        if len(self.free_queue) != self.num_blocks:
            return False
        evicted = self.num_evicted_blocks
        for b in self.blocks:
            if b.block_hash is not None:
                self._evict(b)
        self.num_evicted_blocks = evicted            # a reset is not an eviction under pressure
        return True

    # ---- mutations -------------------------------------------------------------------------
    def _evict(self, b: Block) -> None:
        assert self.cached.get(b.block_hash) == b.block_id, "hash map out of sync"
        del self.cached[b.block_hash]
        self.num_evicted_blocks += 1
        b.block_hash, b.token_ids, b.parent, b.extra_keys = None, (), None, ()
        if self.on_discard is not None:
            self.on_discard(b.block_id)

    def _take_free_block(self) -> int:
        """A block for new contents, from the head of the free queue (evicting its hash)."""
        b = self.blocks[self.free_queue.popleft()]
        assert b.ref_count == 0, f"block {b.block_id} in the free queue has references"
        if b.block_hash is not None:
            self._evict(b)
        b.generation += 1
        b.ref_count = 1
        return b.block_id

    def _take_cached_block(self, b: Block) -> None:
        if b.ref_count == 0:
            self.free_queue.remove(b.block_id)
        b.ref_count += 1

    def _release(self, block_id: int) -> None:
        b = self.blocks[block_id]
        if b.ref_count <= 0:
            raise RuntimeError(f"block {block_id} released more often than it was taken")
        b.ref_count -= 1
        if b.ref_count == 0:
            if b.block_hash is not None:
                self.free_queue.append(block_id)       # keep the contents, evict it last
            else:
                self.free_queue.appendleft(block_id)   # nothing to keep: reuse it first
                if self.on_discard is not None:
                    self.on_discard(block_id)

    def allocate(self, seq, num_computed: int | None = None) -> None:
        """Give seq a block table covering all of its current tokens, reusing its longest cached
        prefix, and register its full blocks up to `num_computed` tokens (default all: the coming
        prefill computes them; a chunked prefill computes fewer, see `register_computed`)."""
        if seq.block_table:
            raise ValueError(f"sequence already holds {len(seq.block_table)} blocks; "
                             "deallocate it before allocating again")
        if len(seq) == 0:
            raise ValueError("cannot allocate blocks for an empty sequence")
        hits = self._cached_prefix(seq)
        num_new = self.num_blocks_for(len(seq)) - len(hits)
        if num_new + sum(b.ref_count == 0 for b in hits) > len(self.free_queue):
            raise RuntimeError(f"sequence needs {self.num_blocks_for(len(seq))} blocks but only "
                               f"{len(self.free_queue)} are free (call can_allocate first)")
        for b in hits:              # take hits first, so the evictions below cannot touch them
            self._take_cached_block(b)
        seq.block_table.extend(b.block_id for b in hits)
        seq.block_table.extend(self._take_free_block() for _ in range(num_new))
        seq.num_cached_tokens = len(hits) * self.block_size
        if self.enable_prefix_caching:
            parent = ROOT
            chain = self._chains[seq.seq_id] = []
            for i, b in enumerate(hits):
                parent, _, _ = self._block_key(seq, i, parent)
                chain.append((parent, b.ref))
            self._register_full_blocks(seq, len(seq) if num_computed is None else num_computed)
            self.prefix_cache_queries += len(seq)
            self.prefix_cache_hits += seq.num_cached_tokens

    def register_computed(self, seq, num_computed: int) -> None:
        """Chunked prefill: the coming step computes seq's tokens up to `num_computed`; its blocks
        that are then full become findable in the prefix cache (never before their K/V exist)."""
        if self.enable_prefix_caching:
            self._register_full_blocks(seq, min(num_computed, len(seq)))

    def may_append(self, seq) -> None:
        """After a token was appended to seq: add a block if the new token opened one. The block
        before it is then full and all its tokens computed, so it is hashed and cached now (the
        newest token's K/V are only computed by the coming step)."""
        need = self.num_blocks_for(len(seq)) - len(seq.block_table)
        if need < 0:
            raise RuntimeError(f"sequence of {len(seq)} tokens holds {len(seq.block_table)} "
                               "blocks: tokens were removed without deallocating")
        if need > len(self.free_queue):
            raise RuntimeError("no free block for the new token (call can_append first)")
        for _ in range(need):
            seq.block_table.append(self._take_free_block())
        if self.enable_prefix_caching:
            self._register_full_blocks(seq, len(seq) - 1)

    def deallocate(self, seq) -> None:
        """Drop seq's references, last block first, and clear its block table."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table.clear()        # num_cached_tokens stays: what the last admission found
        self._chains.pop(seq.seq_id, None)
