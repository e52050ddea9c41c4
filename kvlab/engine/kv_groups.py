"""KV cache groups: one block table per layer type, over one shared pool of blocks.

A model that mixes sliding-window and full-attention layers (Gemma 2: every other layer windowed;
Gemma Team, 2024) cannot let any block go with one block table for all layers: the full layers
need every block. vLLM's hybrid KV cache manager splits the layers into *KV cache groups* by
attention type, gives every request one block table per group and lets a sliding-window group
free the blocks that no future query's window reaches (vLLM: `vllm/v1/core/kv_cache_utils.py`
builds the groups, `kv_cache_coordinator.py`'s `HybridKVCacheCoordinator` drives them,
`single_type_kv_cache_manager.py`'s `SlidingWindowManager` frees and finds hits). kvlab does the
same, written from that idea:

- **Groups** (`KVGroupLayout`): the full-attention layers form group 0, and each distinct window W
  one more group (ascending W). A model with one group (every layer full, or every layer windowed
  with one W: Mistral) keeps the single-table engine; nothing here runs for it.
- **One pool, slots.** The groups share one pool of block ids. The cache holds `num_slots` tensors
  per K and V, `num_slots` = the largest group's layer count, and layer l uses the tensor of its
  rank inside its group (`layer_slot`): tensor j serves the j-th layer of every group, so a block
  id's bytes belong to whichever group holds it. A block id costs `num_slots` layers' bytes
  (half of a single table's for Gemma 2's alternation), and the KV budget counts that.
- **Tables** (`seq.kv_group_tables`, written by `HybridBlockManager` only; `seq.block_table` is
  group 0's list): logical block i of every group holds the sequence's tokens i * block_size
  onwards. A windowed group lets go of the leading blocks that lie wholly before the window of the
  next query (`NO_BLOCK` takes their place, so indexing stays logical, as vLLM's null block). The
  runner strips the leading `NO_BLOCK`s and gives the group cache indices counted from its first
  live block, as `drop_leading` does for a KV budget. At a step whose first query is at position q
  a group with window W holds the blocks from the one of position q - W + 1 on: at most
  ceil((W - 1) / block_size) + 1 while decoding (`window_blocks`), plus the chunk's blocks while
  prefilling (a whole prompt's prefill holds all its blocks for that step).
- **Prefix caching across groups** (vLLM's rule): a block's hash is tagged with its group, so a
  group finds only its own blocks; a hit of k blocks counts only if the full group has blocks
  0..k-1 and every windowed group has the blocks its window needs at the hit point (those holding
  positions k * block_size - W + 1 .. k * block_size - 1). The longest such k is the hit.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvlab.engine.block_manager import BlockManager, PoolCounters
from kvlab.engine.prefix_hash import ROOT, extra_keys_for, hash_block

NO_BLOCK = -1          # a windowed group's table entry whose block was let go (or never needed)


@dataclass(frozen=True)
class KVGroupLayout:
    """windows[g]: group g's window (None: full attention, only group 0); layers[g]: its layers."""
    windows: tuple
    layers: tuple

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def num_slots(self) -> int:
        """Per-layer tensors the cache holds (each per K and V): the largest group's layer count."""
        return max(len(ls) for ls in self.layers)

    @property
    def layer_group(self) -> tuple:
        return tuple(next(g for g, ls in enumerate(self.layers) if layer in ls)
                     for layer in range(sum(map(len, self.layers))))

    @property
    def layer_slot(self) -> tuple:
        return tuple(self.layers[g].index(layer) for layer, g in enumerate(self.layer_group))


def group_layout(sliding_windows, num_layers: int) -> KVGroupLayout:
    """The groups of a model whose per-layer windows are `sliding_windows` (None: all full)."""
    windows = tuple(sliding_windows) if sliding_windows is not None else (None,) * num_layers
    kinds = sorted(set(windows), key=lambda w: (w is not None, w or 0))     # full first, then by W
    return KVGroupLayout(tuple(kinds), tuple(tuple(i for i, w in enumerate(windows) if w == k) for k in kinds))


def window_blocks(window: int, block_size: int) -> int:
    """Blocks a decoding sequence holds at most in a group of window W: ceil((W - 1) / bs) + 1."""
    return -(-(window - 1) // block_size) + 1


def first_needed_block(window: int | None, first_query: int, block_size: int) -> int:
    """The first logical block a query at `first_query` (and every later one) may read."""
    return 0 if window is None else max(0, first_query - window + 1) // block_size


class _GroupView:
    """A sequence as one group's block manager sees it: the group's table as `block_table`."""

    def __init__(self, seq, table: list):
        self.seq, self.block_table = seq, table
        self.seq_id, self.token_ids, self.cache_salt = seq.seq_id, seq.token_ids, seq.cache_salt

    def __len__(self) -> int:
        return len(self.seq)


class _GroupManager(BlockManager):
    """One group's bookkeeping (tables, hash chains, registration) over the pool it is given: the
    `blocks`, free queue and hash map of the first group's manager, shared by reference."""

    def __init__(self, group: int, window, pool: BlockManager | None, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool):
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.group, self.window = group, window
        if pool is not None:
            self.blocks, self.free_queue, self.cached = pool.blocks, pool.free_queue, pool.cached

    def _block_key(self, seq, i: int, parent_hash: bytes):
        tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
        extra = (extra_keys_for(seq.cache_salt) + (b"kv-group:%d" % self.group,)) if i == 0 else ()
        return hash_block(parent_hash, tokens, extra), tokens, extra

    def probe(self, seq, num_blocks: int) -> tuple[list, list]:
        """(block or None, hash) of seq's first `num_blocks` blocks, each looked up on its own (a
        windowed group may miss a block and still hit later ones). Pure."""
        found, hashes, parent = [], [], ROOT
        for i in range(num_blocks):
            h, tokens, extra = self._block_key(seq, i, parent)
            b = self.blocks[self.cached[h]] if h in self.cached else None
            if b is not None and (b.token_ids, b.extra_keys, b.parent_hash) != (tokens, extra, parent):
                b = None                                       # a hash collision: a miss
            found.append(b)
            hashes.append(h)
            parent = h
        return found, hashes

    def covers(self, found: list, k: int) -> bool:
        """Does this group hold what a hit of k blocks needs (its window's blocks at the hit)?"""
        lo = first_needed_block(self.window, k * self.block_size, self.block_size)
        return all(b is not None for b in found[lo:k])

    def droppable(self, table: list, first_query: int) -> list[int]:
        """Live blocks of `table` wholly before the window of a query at `first_query`."""
        lo = first_needed_block(self.window, first_query, self.block_size)
        return [b for b in table[:lo] if b != NO_BLOCK]

    def drop(self, table: list, first_query: int) -> None:
        lo = first_needed_block(self.window, first_query, self.block_size)
        for i in reversed(range(min(lo, len(table)))):
            if table[i] != NO_BLOCK:
                self._release(table[i])
                table[i] = NO_BLOCK

    def _release(self, block_id: int) -> None:
        if block_id != NO_BLOCK:
            super()._release(block_id)

    def _register_entry(self, block_id: int, h: bytes, tokens: tuple, parent: tuple, extra):
        if block_id == NO_BLOCK:                           # let go before it was registered
            return None
        return super()._register_entry(block_id, h, tokens, parent, extra)


class HybridBlockManager(PoolCounters):
    """The block allocator of a model with several KV cache groups (kvlab/engine/protocols.py,
    `BlockAllocator`). HybridBlockManager(num_blocks, block_size, windows, enable_prefix_caching):
    `windows` is `KVGroupLayout.windows`. Per sequence it keeps one table per group
    (`seq.kv_group_tables`), every group drawing block ids from one pool; the chunk a step computes
    starts at `seq.num_computed_tokens` (the scheduler advances it after planning), so `can_append`
    / `may_append` let a windowed group's out-of-window blocks go first."""

    supports_chunked_prefill = True

    def __init__(self, num_blocks: int, block_size: int, windows, enable_prefix_caching: bool = True):
        args = (num_blocks, block_size, enable_prefix_caching)
        first = _GroupManager(0, windows[0], None, *args)
        self.groups = [first] + [_GroupManager(g, w, first, *args) for g, w in enumerate(windows) if g]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks, self.free_queue, self.cached = first.blocks, first.free_queue, first.cached
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- queries (and PoolCounters') ------------------------------------------------------------
    @property
    def num_evicted_blocks(self) -> int:
        return sum(g.num_evicted_blocks for g in self.groups)

    def live_blocks(self, seq) -> list[int]:
        """Blocks seq holds in each group."""
        return [sum(b != NO_BLOCK for b in t) for t in getattr(seq, "kv_group_tables", [])]

    def _tables(self, seq, create: bool = True) -> list[list]:
        """seq's table per group (seq.block_table is group 0's); made empty on first use."""
        tables = getattr(seq, "kv_group_tables", None)
        if not tables or tables[0] is not seq.block_table:
            tables = [seq.block_table] + [[] for _ in self.groups[1:]]
            if create:
                seq.kv_group_tables = tables
        return tables

    def _hit(self, seq) -> tuple[int, list, list]:
        """(k, found, hashes): the longest hit of k blocks every group covers (module docstring),
        and each group's probe. Pure."""
        if not self.enable_prefix_caching:
            return 0, [[] for _ in self.groups], [[] for _ in self.groups]
        kmax = (len(seq) - 1) // self.block_size            # the last token is always computed
        probes = [g.probe(seq, kmax) for g in self.groups]
        k = kmax
        while k > 0 and not all(g.covers(f, k) for g, (f, _) in zip(self.groups, probes)):
            k -= 1
        return k, [f for f, _ in probes], [h for _, h in probes]

    def lookup(self, seq) -> int:
        return self._hit(seq)[0] * self.block_size

    def _hits(self, k: int, found: list) -> list[list]:
        """Each group's blocks to take for a hit of k blocks (None where the window needs none)."""
        hits = []
        for g, f in zip(self.groups, found):
            lo = first_needed_block(g.window, k * self.block_size, self.block_size)
            hits.append([None] * lo + f[lo:k])
        return hits

    def _allocate_need(self, seq, n: int, k: int, hits: list) -> int:
        fresh = max(self.num_blocks_for(n) - k, 0) * len(self.groups)
        return fresh + sum(b is not None and b.ref_count == 0 for h in hits for b in h)

    def can_allocate(self, seq, num_tokens: int | None = None) -> bool:
        n = len(seq) if num_tokens is None else num_tokens
        k, found, _ = self._hit(seq)
        return self._allocate_need(seq, n, k, self._hits(k, found)) <= len(self.free_queue)

    def can_append(self, seq, num_tokens: int | None = None) -> bool:
        n = len(seq) if num_tokens is None else num_tokens
        free, need = len(self.free_queue), 0
        for g, table in zip(self.groups, self._tables(seq, create=False)):
            free += sum(self.blocks[b].ref_count == 1 for b in g.droppable(table, seq.num_computed_tokens))
            need += max(self.num_blocks_for(n) - len(table), 0)
        return need <= free

    # ---- mutations -------------------------------------------------------------------------
    def allocate(self, seq, num_tokens: int | None = None, num_computed: int | None = None) -> None:
        """Give seq one table per group for its first `num_tokens` tokens, reusing the longest hit
        every group covers (`seq.num_cached_tokens`); the windowed groups skip the blocks before
        the hit's window."""
        n, num_computed = self._allocate_args(seq, num_tokens, num_computed)
        k, found, hashes = self._hit(seq)
        if not 0 < n <= len(seq) or n < k * self.block_size:
            raise ValueError(f"num_tokens must be in [{k * self.block_size or 1}, {len(seq)}] "
                             f"(the cached prefix .. the sequence), got {n}")
        hits = self._hits(k, found)
        if self._allocate_need(seq, n, k, hits) > len(self.free_queue):
            raise RuntimeError(f"sequence needs {self._allocate_need(seq, n, k, hits)} blocks but only "
                               f"{len(self.free_queue)} are free (call can_allocate first)")
        tables = self._tables(seq)
        for g, h in zip(self.groups, hits):      # every group's hits first: no eviction touches them
            for b in h:
                if b is not None:
                    g._take_cached_block(b)
        for g, h, table, hs in zip(self.groups, hits, tables, hashes):
            table.extend(NO_BLOCK if b is None else b.block_id for b in h)
            table.extend(g._take_free_block() for _ in range(self.num_blocks_for(n) - k))
            if self.enable_prefix_caching:
                g._chains[seq.seq_id] = [(hs[i], None if b is None else b.ref) for i, b in enumerate(h)]
                g._register_full_blocks(_GroupView(seq, table), num_computed)
        seq.num_cached_tokens = k * self.block_size
        self.prefix_cache_queries += len(seq)
        self.prefix_cache_hits += seq.num_cached_tokens

    def may_append(self, seq, num_tokens: int | None = None) -> None:
        """Let each windowed group's blocks before the window of the chunk's first query
        (`seq.num_computed_tokens`) go, then grow every table to `num_tokens` tokens."""
        n = len(seq) if num_tokens is None else num_tokens
        if not self.can_append(seq, n):
            raise RuntimeError("no free block for the new tokens (call can_append first)")
        tables = self._tables(seq)
        for g, table in zip(self.groups, tables):
            g.drop(table, seq.num_computed_tokens)
        for g, table in zip(self.groups, tables):
            table.extend(g._take_free_block() for _ in range(max(self.num_blocks_for(n) - len(table), 0)))
        if num_tokens is None:
            self.register_computed(seq, len(seq) - 1)

    def register_computed(self, seq, num_computed: int) -> None:
        for g, table in zip(self.groups, self._tables(seq)):
            g.register_computed(_GroupView(seq, table), num_computed)

    def deallocate(self, seq) -> None:
        """Drop seq's references in every group (last group first, each last block first)."""
        for g, table in reversed(list(zip(self.groups, self._tables(seq)))):
            g.deallocate(_GroupView(seq, table))

    def take_events(self) -> list[int]:
        return [b for g in self.groups for b in g.take_events()]

    def reset_prefix_cache(self) -> bool:
        return self.groups[0].reset_prefix_cache()
