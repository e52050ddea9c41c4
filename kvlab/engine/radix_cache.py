"""A radix-tree prefix cache, the other way to share K/V: SGLang's RadixAttention.

Zheng et al., 2024, "SGLang: Efficient Execution of Structured Language Model Programs", keep every
computed token's K/V in a radix tree keyed by token ids. Where the hash-chain BlockManager shares
whole blocks, the tree shares at **token** granularity: an edge holds a run of tokens and one KV
slot per token, and a lookup finds the longest common prefix to the token.

- **match**: walk down from the root while the tokens agree. A match that ends inside an edge
  splits it, so the matched part becomes its own node.
- **insert**: after a sequence's K/V are computed, its tokens and slots are added to the tree;
  where the tree already has a token, the tree's slot wins and the sequence's copy is freed.
- **lock**: a running sequence holds a reference on the node its cached path ends at; the count is
  kept on every node up to the root, so a locked path is never evicted.
- **evict**: when slots run out, free least-recently-used *leaves* with no lock; a parent whose
  last child went becomes a leaf and a candidate in turn.

`RadixCache` follows the BlockManager's protocol (kvlab/engine/protocols.py, `BlockAllocator`:
`lookup`, `can_allocate`, `allocate`, `can_append`, `may_append`, `register_computed`,
`deallocate`, `take_events`, `usage`, the prefix-cache counters) with blocks of one token: a
sequence's `block_table` lists one slot per token, so it runs the engine at block_size=1
(`kvlab.LLM(prefix_cache="radix")`). It enters an admitted prompt into the tree at once: a
sequence admitted in the same step that matches it reads, in every layer, K/V written earlier in
that same layer of the same forward. So it does not do chunked prefill.
Requests with different `cache_salt` live under different roots and never share.
Like the BlockManager it counts on the engine's order: an admitted sequence's prompt is computed by
the coming step, and at `deallocate` every token but the newest has its K/V computed.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque


class Node:
    __slots__ = ("key", "slots", "children", "parent", "lock_ref", "last_access")

    def __init__(self, key: tuple, slots: list, parent: Node | None, lock_ref: int = 0):
        self.key, self.slots, self.parent = key, slots, parent
        self.children: dict[int, Node] = {}
        self.lock_ref = lock_ref
        self.last_access = 0


class RadixCache:
    """Token-granular prefix cache over `num_slots` KV slots (blocks of one token)."""

    block_size = 1
    supports_chunked_prefill = False

    def __init__(self, num_slots: int, enable_prefix_caching: bool = True):
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_blocks = num_slots
        self.enable_prefix_caching = enable_prefix_caching
        self.free_slots: deque[int] = deque(range(num_slots))
        self.roots: dict[str | None, Node] = {}        # one tree per cache_salt
        self.evictable_size = 0                       # slots held by unlocked nodes
        self._clock = itertools.count(1)
        self._seqs: dict[int, tuple] = {}            # seq_id -> (locked node, prompt length, own slots)
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_evicted_blocks = 0                   # slots evicted from the tree
        self._events: list[int] = []                  # slots dropped since take_events()
        self._rolled_back: dict[int, int] = {}        # seq_id -> tokens computed (failed step)

    def take_events(self) -> list[int]:
        """Slots whose contents were dropped (freed or evicted) since the last call."""
        events, self._events = self._events, []
        return events

    def lookup(self, seq) -> int:
        """Tokens of seq the tree holds (never the last). Pure."""
        return self._match_len(seq)[0]

    def register_computed(self, seq, num_computed: int) -> None:
        """An admitted prompt entered the tree at allocate (see the module doc), so there is
        nothing to register. A smaller count than its prompt is the scheduler's rollback of a
        failed admission step: the prompt's K/V were never written, so at `deallocate` the
        tree's tokens of seq's path beyond `num_computed` are taken out (`_rolled_back`)."""
        state = self._seqs.get(seq.seq_id)
        if state is not None and state[0] is not None and num_computed < state[1]:
            self._rolled_back[seq.seq_id] = num_computed

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_slots)

    def usage(self) -> float:
        """Fraction of slots that running sequences need (locked or their own)."""
        return 1.0 - (len(self.free_slots) + self.evictable_size) / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def _root(self, salt) -> Node:
        if salt not in self.roots:
            self.roots[salt] = Node((), [], None, lock_ref=1)   # a root is never evicted
        return self.roots[salt]

    def _walk(self, root: Node, tokens, split: bool):
        """Follow tokens down from root -> (last node, matched slots, matched length, number of
        matched tokens on unlocked nodes). With split=True a match ending inside an edge splits
        it and nodes on the path are marked used; without, nothing changes."""
        node, slots, i, unlocked = root, [], 0, 0
        now = next(self._clock) if split else 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            k = 0
            while k < len(child.key) and i + k < len(tokens) and child.key[k] == tokens[i + k]:
                k += 1
            if k < len(child.key):
                if not split:
                    slots += child.slots[:k]
                    unlocked += k if child.lock_ref == 0 else 0
                    i += k
                    break
                child = self._split(child, k)
            if split:
                child.last_access = now
            slots += child.slots
            unlocked += len(child.key) if child.lock_ref == 0 else 0
            i += len(child.key)
            node = child
        return node, slots, i, unlocked

    def _split(self, child: Node, k: int) -> Node:
        """Cut child's edge after k tokens; the new upper node inherits its lock and age."""
        upper = Node(child.key[:k], child.slots[:k], child.parent, child.lock_ref)
        upper.last_access = child.last_access
        child.key, child.slots, child.parent = child.key[k:], child.slots[k:], upper
        upper.children[child.key[0]] = child
        upper.parent.children[upper.key[0]] = upper
        return upper

    def _match_len(self, seq) -> tuple[int, int]:
        """(tokens seq would find cached, of which on unlocked nodes); the last token never."""
        if not self.enable_prefix_caching or seq.cache_salt not in self.roots:
            return 0, 0
        _, _, m, unlocked = self._walk(self.roots[seq.cache_salt], seq.token_ids[:len(seq) - 1], False)
        return m, unlocked

    def can_allocate(self, seq, num_tokens: int | None = None) -> bool:
        m, unlocked = self._match_len(seq)
        return len(seq) - m <= len(self.free_slots) + self.evictable_size - unlocked

    def can_append(self, seq, num_tokens: int | None = None) -> bool:
        n = len(seq) if num_tokens is None else num_tokens
        return n - len(seq.block_table) <= len(self.free_slots) + self.evictable_size

    # ---- the tree ----------------------------------------------------------------------------
    def _insert(self, root: Node, tokens, slots) -> tuple[Node, int]:
        """Add tokens with their slots; -> (node where they end, tokens the tree already had)."""
        node, _, present, _ = self._walk(root, tokens, split=True)
        if present < len(tokens):
            leaf = Node(tuple(tokens[present:]), list(slots[present:]), node)
            leaf.last_access = next(self._clock)
            node.children[tokens[present]] = leaf
            self.evictable_size += len(leaf.key)
            node = leaf
        return node, present

    def _lock(self, node: Node) -> None:
        while node is not None:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
            node.lock_ref += 1
            node = node.parent

    def _unlock(self, node: Node) -> None:
        while node is not None:
            node.lock_ref -= 1
            assert node.lock_ref >= 0, "radix node unlocked more often than locked"
            if node.lock_ref == 0:
                self.evictable_size += len(node.key)
            node = node.parent

    def _nodes(self):
        stack = list(self.roots.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def evict(self, num_slots: int) -> int:
        """Free at least num_slots slots (if the unlocked tree holds them), LRU leaves first."""
        heap = [(n.last_access, id(n), n) for n in self._nodes()
                if not n.children and n.lock_ref == 0 and n.parent is not None]
        heapq.heapify(heap)
        freed = 0
        while freed < num_slots and heap:
            _, _, n = heapq.heappop(heap)
            self.free_slots.extend(n.slots)
            self._events.extend(n.slots)
            freed += len(n.slots)
            self.evictable_size -= len(n.key)
            del n.parent.children[n.key[0]]
            p = n.parent
            if p.parent is not None and not p.children and p.lock_ref == 0:
                heapq.heappush(heap, (p.last_access, id(p), p))
        self.num_evicted_blocks += freed
        return freed

    def _take(self, n: int) -> list[int]:
        if n > len(self.free_slots):
            self.evict(n - len(self.free_slots))
        if n > len(self.free_slots):
            raise RuntimeError(f"need {n} KV slots, only {len(self.free_slots)} free after eviction "
                               "(call can_allocate/can_append first)")
        return [self.free_slots.popleft() for _ in range(n)]

    def reset_prefix_cache(self) -> bool:
        if self._seqs:
            return False
        evicted = self.num_evicted_blocks
        self.evict(self.evictable_size)
        self.num_evicted_blocks = evicted
        return True

    # ---- the sequence interface ------------------------------------------------------------
    def allocate(self, seq, num_tokens: int | None = None) -> None:
        if num_tokens is not None and num_tokens != len(seq):
            raise ValueError(f"RadixCache allocates whole prompts (no chunked prefill): num_tokens "
                             f"must be {len(seq)}, got {num_tokens}")
        if seq.block_table:
            raise ValueError(f"sequence already holds {len(seq.block_table)} slots; deallocate it first")
        if len(seq) == 0:
            raise ValueError("cannot allocate slots for an empty sequence")
        if not self.can_allocate(seq):
            raise RuntimeError(f"sequence of {len(seq)} tokens does not fit (call can_allocate first)")
        n = len(seq)
        if not self.enable_prefix_caching:
            seq.block_table.extend(self._take(n))
            seq.num_cached_tokens = 0
            self._seqs[seq.seq_id] = (None, n, list(seq.block_table))
            self.prefix_cache_queries += n
            return
        root = self._root(seq.cache_salt)
        node, cached_slots, m, _ = self._walk(root, seq.token_ids[:n - 1], split=True)
        self._lock(node)                               # nothing on the path may be evicted now
        seq.block_table.extend(cached_slots + self._take(n - m))
        seq.num_cached_tokens = m
        # the prompt is computed by the coming prefill: enter it (the tree keeps slots it had)
        end, present = self._insert(root, seq.token_ids, seq.block_table)
        self._lock(end)
        self._unlock(node)
        self._seqs[seq.seq_id] = (end, n, seq.block_table[m:present])   # copies the tree had
        self.prefix_cache_queries += n
        self.prefix_cache_hits += m

    def may_append(self, seq, num_tokens: int | None = None) -> None:
        need = (len(seq) if num_tokens is None else num_tokens) - len(seq.block_table)
        if need < 0:
            raise RuntimeError("tokens were removed from a sequence without deallocating it")
        seq.block_table.extend(self._take(need))

    def deallocate(self, seq) -> None:
        """Enter the computed tokens (all but the newest) into the tree, free the rest, unlock."""
        state = self._seqs.pop(seq.seq_id, None)
        table = seq.block_table
        if state is None:
            table.clear()
            return
        node, prompt_len, own = state
        if node is None:                               # caching off: every slot is the sequence's
            self.free_slots.extend(table)
            self._events.extend(table)
            table.clear()
            return
        computed = self._rolled_back.pop(seq.seq_id, None)
        if computed is not None:                       # a failed step: nothing of it is kept
            self._unlock(node)
            self._free(list(own) + table[prompt_len:])
            self._remove_beyond(self._root(seq.cache_salt), seq.token_ids[:prompt_len], computed)
            table.clear()
            return
        n = max(len(seq) - 1, prompt_len)
        free = list(own)
        if n > prompt_len:
            _, present = self._insert(self._root(seq.cache_salt), seq.token_ids[:n], table[:n])
            free += table[prompt_len:max(present, prompt_len)]
        free += table[n:]
        self._unlock(node)
        self._free(free)
        table.clear()

    def _free(self, slots) -> None:
        self.free_slots.extend(slots)
        self._events.extend(slots)

    def _remove_beyond(self, root: Node, tokens, depth: int) -> None:
        """Take out of the tree the tokens of path `tokens` past the first `depth` (their K/V were
        never computed): the unlocked subtree below that point goes, its slots freed. A locked
        part belongs to another sequence of the same failed step; its own rollback removes it."""
        node, i = root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None or child.key != tuple(tokens[i:i + len(child.key)]):
                return
            if i + len(child.key) > depth:
                if i < depth:                          # the cut falls inside this edge
                    self._split(child, depth - i)
                    child = node.children[tokens[i]].children[tokens[depth]]
                    node = child.parent
                if child.lock_ref:
                    return
                del node.children[child.key[0]]
                stack = [child]
                while stack:
                    n = stack.pop()
                    self.evictable_size -= len(n.key)
                    self._free(n.slots)
                    stack.extend(n.children.values())
                return
            i += len(child.key)
            node = child
