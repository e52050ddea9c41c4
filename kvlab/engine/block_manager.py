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
  hash of the block it was computed on top of (which, chained, names the whole prefix). A hash
  collision therefore shows up as a miss; it can never hand back another prompt's keys and values.
  A hit checks its parent by hash (`parent_hash`), not by block id (`parent`, kept for the
  chapters): when a de-duplicated parent is evicted and the same prefix is computed again into
  another block, the child is found under it again;
- when a block's count drops to zero it keeps its contents and its hash and joins the *tail* of
  the free queue (a sequence's blocks in reverse order, so its last block is reused first). New
  blocks come from the *head*, and taking a cached block from there evicts its hash: the free
  queue is an LRU list of evictable cached blocks. A block with nothing worth keeping (no hash)
  goes to the head instead. A hit on a free cached block pulls it out of the queue in O(1).

The scheduler (its only owner in the engine) drives it through the `BlockAllocator` protocol of
kvlab/engine/protocols.py: `lookup` / `can_allocate` / `allocate(seq, num_tokens)` when a waiting
sequence is admitted (blocks for its first `num_tokens` tokens: the whole prompt, or the first
chunk); `can_append` / `may_append(seq, num_tokens)` to grow a table (a decode's newest token, the
next chunk); `register_computed(seq, n)` for the tokens the planned step computes (their full
blocks become findable; called again with a smaller n if that step's forward fails, which takes
them back); `deallocate` when a sequence finishes, is aborted or is preempted. Blocks whose
contents are dropped (freed without a hash, or evicted) are *recorded*, not announced:
`take_events()` hands them over, once, and the engine passes them to the KV cache at the start of
the next step, before any row of that step opens.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvlab.engine.prefix_hash import ROOT, extra_keys_for, hash_block


def _stored(seq, num_tokens: int) -> int:
    """Entries the cache holds for seq's first num_tokens tokens (less those a KV budget dropped)."""
    return num_tokens - getattr(seq, "num_evicted_tokens", 0)


@dataclass
class Block:
    """One physical block. `generation` counts how often its contents were replaced; (block_id,
    generation) names one particular content (`ref`)."""
    block_id: int
    ref_count: int = 0
    generation: int = 0
    block_hash: bytes | None = None      # set while registered in the prefix cache
    token_ids: tuple = ()                # the tokens whose K/V it holds (when registered)
    parent: tuple | None = None          # ref (block_id, generation) of the block before it
    parent_hash: bytes | None = None     # hash of the block before it (ROOT for a first block)
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


class PoolCounters:
    """What a block allocator over one pool reports from `free_queue`, `num_blocks`, `block_size`
    and its two prefix-cache counters (BlockManager, and kv_groups.HybridBlockManager)."""

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

    @staticmethod
    def _allocate_args(seq, num_tokens, num_computed) -> tuple[int, int]:
        """`allocate`'s checks and defaults: (tokens to cover, tokens that count as computed)."""
        if seq.block_table:
            raise ValueError(f"sequence already holds {len(seq.block_table)} blocks; "
                             "deallocate it before allocating again")
        if len(seq) == 0:
            raise ValueError("cannot allocate blocks for an empty sequence")
        n = len(seq) if num_tokens is None else num_tokens
        if num_computed is None:
            num_computed = len(seq) if num_tokens is None else 0
        return n, num_computed


class BlockManager(PoolCounters):
    """Allocate, grow, share and free the block tables of sequences over a fixed pool of blocks.

    A sequence needs `seq_id`, `token_ids`, `block_table`, `num_cached_tokens`, `cache_salt` and
    `__len__`; `kvlab.engine.sequence.Sequence` has them. Counters, in tokens, named like vLLM's,
    kept here and nowhere else: `prefix_cache_queries` (prompt tokens looked up at admission, also
    with caching off) and `prefix_cache_hits` (tokens found); `num_evicted_blocks` counts cached
    blocks whose contents were dropped for new ones.

    `take_events()` returns (and forgets) the ids of blocks whose contents were dropped since the
    last call: freed with no prefix-cache hash (nobody can find them again), or evicted. A cache
    that keeps per-block state outside its pool (int4's residual rows, sink rows) lets it go then.
    """

    supports_chunked_prefill = True

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 max_cached_first_blocks: int | None = None):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._events: list[int] = []                          # dropped since take_events()
        # a cache that keeps a sink row per first block (keep_sink_token) bounds the free cached
        # first blocks: beyond the cap the oldest is evicted (kvlab/engine/kv_budget.py)
        self.max_cached_first_blocks = max_cached_first_blocks
        self._free_first: OrderedDict[int, None] = OrderedDict()
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(range(num_blocks))
        self.cached: dict[bytes, int] = {}                    # block hash -> block id
        self._chains: dict[int, list[tuple]] = {}  # seq_id -> (hash, canonical ref) per hashed block
        self._cut: set[int] = set()                # seq_ids whose blocks no longer hold a prefix
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_evicted_blocks = 0                           # cached blocks reused for new contents

    # ---- queries (and PoolCounters') ------------------------------------------------------------
    @property
    def num_cached_first_blocks(self) -> int:
        """Free blocks that still hold a sequence's first block (each keeps its sink row)."""
        return len(self._free_first)

    def lookup(self, seq) -> int:
        """Tokens of seq the prefix cache holds (whole blocks, never the last token). Pure."""
        return len(self._cached_prefix(seq)) * self.block_size

    def can_allocate(self, seq, num_tokens: int | None = None) -> bool:
        """Are there enough free blocks for seq's first `num_tokens` tokens (default all)? Cached
        blocks another sequence is using cost nothing; cached blocks in the free queue still do."""
        n = len(seq) if num_tokens is None else num_tokens
        hits = self._cached_prefix(seq)
        need = max(self.num_blocks_for(n), len(hits)) - sum(b.ref_count > 0 for b in hits)
        return need <= len(self.free_queue)

    def can_append(self, seq, num_tokens: int | None = None) -> bool:
        """Is there room for seq's first `num_tokens` tokens (default all: its newest token)? It
        needs fresh blocks only for the tokens that no longer fit in the blocks it holds."""
        n = len(seq) if num_tokens is None else num_tokens
        return self.num_blocks_for(_stored(seq, n)) - len(seq.block_table) <= len(self.free_queue)

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
        parent_hash = ROOT
        for i in range((len(seq) - 1) // self.block_size):
            h, tokens, extra = self._block_key(seq, i, parent_hash)
            block_id = self.cached.get(h)
            if block_id is None:
                break
            b = self.blocks[block_id]
            if (b.token_ids, b.extra_keys, b.parent_hash) != (tokens, extra, parent_hash):
                break                                  # a hash collision: a miss
            hits.append(b)
            parent_hash = h
        return hits

    def _register(self, block: Block, h: bytes, tokens: tuple, parent: tuple, extra) -> tuple:
        """Enter a freshly computed full block into the cache; return the ref its child records as
        parent. If the same content is already cached under h (this sequence computed a copy),
        the cached copy stays the canonical one and children hang under it; a different content
        under h (a collision) leaves this block uncached."""
        other_id = self.cached.get(h)
        if other_id is None:
            block.block_hash, block.token_ids = h, tokens
            block.parent, block.extra_keys = parent[1], extra
            block.parent_hash = parent[0]
            self.cached[h] = block.block_id
            return block.ref
        other = self.blocks[other_id]
        if (other.token_ids, other.extra_keys, other.parent_hash) == (tokens, extra, parent[0]):
            return other.ref
        return block.ref

    def _register_full_blocks(self, seq, num_computed: int) -> None:
        """Hash every block of seq whose tokens are all computed and that has no hash yet."""
        chain = self._chains.setdefault(seq.seq_id, [])
        while len(chain) < min(num_computed // self.block_size, len(seq.block_table)):
            i = len(chain)
            parent = chain[-1] if chain else (ROOT, None)
            h, tokens, extra = self._block_key(seq, i, parent[0])
            chain.append((h, self._register_entry(seq.block_table[i], h, tokens, parent, extra)))

    def _register_entry(self, block_id: int, h: bytes, tokens: tuple, parent: tuple, extra):
        """Register the block at one table entry; its canonical ref (kv_groups: None for a let-go entry)."""
        return self._register(self.blocks[block_id], h, tokens, parent, extra)

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
        self._free_first.pop(b.block_id, None)
        self.num_evicted_blocks += 1
        b.block_hash, b.token_ids, b.parent, b.extra_keys, b.parent_hash = None, (), None, (), None
        self._events.append(b.block_id)

    def take_events(self) -> list[int]:
        """Ids of the blocks whose contents were dropped since the last call (each once)."""
        events, self._events = self._events, []
        return events

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
            self._free_first.pop(b.block_id, None)
        b.ref_count += 1

    def _release(self, block_id: int) -> None:
        b = self.blocks[block_id]
        if b.ref_count <= 0:
            raise RuntimeError(f"block {block_id} released more often than it was taken")
        b.ref_count -= 1
        if b.ref_count == 0:
            if b.block_hash is not None:
                self.free_queue.append(block_id)       # keep the contents, evict it last
                if b.parent_hash == ROOT and self.max_cached_first_blocks is not None:
                    self._free_first[block_id] = None
                    if len(self._free_first) > self.max_cached_first_blocks:
                        oldest = self.blocks[next(iter(self._free_first))]
                        self._evict(oldest)            # its sink row goes back with its hash
                        self.free_queue.remove(oldest.block_id)
                        self.free_queue.appendleft(oldest.block_id)
            else:
                self.free_queue.appendleft(block_id)   # nothing to keep: reuse it first
                self._events.append(block_id)

    def allocate(self, seq, num_tokens: int | None = None, num_computed: int | None = None) -> None:
        """Give seq a block table covering its first `num_tokens` tokens (default all), reusing
        its longest cached prefix (`seq.num_cached_tokens` says how much was found).

        In the engine (`num_tokens` given) nothing is registered here: the scheduler calls
        `register_computed` once the step has computed the tokens. Called alone, as the chapters
        do, `allocate(seq)` assumes the coming prefill computes every token and registers its full
        blocks at once; `num_computed` overrides how many tokens count as computed."""
        n, num_computed = self._allocate_args(seq, num_tokens, num_computed)
        hits = self._cached_prefix(seq)
        if not 0 < n <= len(seq) or n < len(hits) * self.block_size:
            raise ValueError(f"num_tokens must be in [{len(hits) * self.block_size or 1}, {len(seq)}] "
                             f"(the cached prefix .. the sequence), got {n}")
        num_new = self.num_blocks_for(n) - len(hits)
        if num_new + sum(b.ref_count == 0 for b in hits) > len(self.free_queue):
            raise RuntimeError(f"sequence needs {self.num_blocks_for(n)} blocks but only "
                               f"{len(self.free_queue)} are free (call can_allocate first)")
        for b in hits:              # take hits first, so the evictions below cannot touch them
            self._take_cached_block(b)
        seq.block_table.extend(b.block_id for b in hits)
        seq.block_table.extend(self._take_free_block() for _ in range(num_new))
        seq.num_cached_tokens = len(hits) * self.block_size
        self.prefix_cache_queries += len(seq)
        self.prefix_cache_hits += seq.num_cached_tokens
        if self.enable_prefix_caching:
            chain = self._chains[seq.seq_id] = []
            for b in hits:
                chain.append((b.block_hash, b.ref))
            self._register_full_blocks(seq, num_computed)

    def register_computed(self, seq, num_computed: int) -> None:
        """The coming step computes seq's tokens up to `num_computed`: its blocks that are then
        full become findable in the prefix cache (sequences admitted in the same step read K/V
        the same forward writes first). A smaller `num_computed` than before takes back what this
        sequence registered past it: the step's forward failed, those K/V do not exist."""
        if not self.enable_prefix_caching or seq.seq_id in self._cut:
            return
        chain = self._chains.get(seq.seq_id, [])
        keep = num_computed // self.block_size
        while len(chain) > keep:
            h, _ = chain.pop()
            b = self.blocks[seq.block_table[len(chain)]]
            if self.cached.get(h) == b.block_id:
                self._evict(b)
                b.generation += 1
        self._register_full_blocks(seq, min(num_computed, len(seq)))

    def may_append(self, seq, num_tokens: int | None = None) -> None:
        """Grow seq's table to hold its first `num_tokens` tokens (a decode's newest token, or the
        next chunk of a prompt). Called alone with the default (all tokens, after a sampled token
        was appended), the blocks before the newest token are computed and get registered."""
        n = len(seq) if num_tokens is None else num_tokens
        need = self.num_blocks_for(_stored(seq, n)) - len(seq.block_table)
        if need < 0 and num_tokens is None:
            raise RuntimeError(f"sequence of {len(seq)} tokens holds {len(seq.block_table)} "
                               "blocks: tokens were removed without deallocating")
        if need > len(self.free_queue):
            raise RuntimeError("no free block for the new token (call can_append first)")
        for _ in range(need):
            seq.block_table.append(self._take_free_block())
        if self.enable_prefix_caching and num_tokens is None:
            self._register_full_blocks(seq, len(seq) - 1)

    def deallocate(self, seq) -> None:
        """Drop seq's references, last block first, and clear its block table."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table.clear()        # num_cached_tokens stays: what the last admission found
        self._chains.pop(seq.seq_id, None)
        self._cut.discard(seq.seq_id)

    # ---- a per-sequence KV budget (kvlab/engine/kv_eviction.py) -----------------------------
    def _reusable(self, seq) -> list[int]:
        """seq's blocks a cut may write into: its own (one reference) and findable by no one."""
        return [b for b in seq.block_table
                if self.blocks[b].ref_count == 1 and self.blocks[b].block_hash is None]

    def can_compact(self, seq, num_keep: int) -> bool:
        """Could `compact(seq, num_keep)` place the kept entries now? It writes into seq's own
        unshared blocks first; the rest come from the free queue, joined by the blocks only seq
        held (a cached block keeps its contents until it is taken)."""
        reuse = len(self._reusable(seq))
        released = sum(self.blocks[b].ref_count == 1 for b in seq.block_table) - reuse
        return self.num_blocks_for(num_keep) - reuse <= len(self.free_queue) + released

    def compact(self, seq, num_keep: int) -> None:
        """seq keeps `num_keep` entries, to be copied to the front of its new table by the cache
        before the step's forward. A block another sequence shares, or one the prefix cache can
        find, is never written: seq lets go of it (it stays cached) and takes a fresh block. From
        its first cut on, seq's blocks no longer hold a prefix: nothing more of it is registered."""
        need = self.num_blocks_for(num_keep)
        reuse = self._reusable(seq)[:need]
        for block_id in reversed(seq.block_table):
            if block_id not in reuse:
                self._release(block_id)
        seq.block_table[:] = reuse + [self._take_free_block() for _ in range(need - len(reuse))]
        self._freeze(seq)

    def drop_leading(self, seq, num_blocks: int) -> None:
        """seq's first `num_blocks` blocks left its window whole: let go of them, nothing moves."""
        for block_id in reversed(seq.block_table[:num_blocks]):
            self._release(block_id)
        del seq.block_table[:num_blocks]
        self._freeze(seq)

    def _freeze(self, seq) -> None:
        self._cut.add(seq.seq_id)
        self._chains.pop(seq.seq_id, None)
