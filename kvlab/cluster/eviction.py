"""Which cached prefix blocks to drop when the budget is full: LRU, LFU and a cost-aware policy.

A prefix cache (chapter 08: vLLM's hash-chained blocks, Kwon et al., 2023; SGLang's radix tree,
Zheng et al., 2024, "SGLang: Efficient Execution of Structured Language Model Programs") keeps the
K/V of finished requests so a later request with the same prefix skips that part of its prefill.
Memory is finite: at `budget_blocks` something must go. Blocks form a tree (block i's K/V are only
usable after blocks 0..i-1), so like SGLang's tree this cache evicts **leaves only**: a block
whose children are still cached is never dropped first, so every cached block stays reachable.

Policies give each block a priority when it is touched; the lowest priority leaf goes first (ties:
the block cached earliest):

- `LRU`: priority = time of last use (vLLM's free queue and SGLang's tree both evict this way);
- `LFU`: priority = (uses, time of last use): popular blocks stay, but a block popular long ago
  stays too;
- `GDSF` (cost-aware): priority = L + uses x cost / size, Greedy-Dual-Size-Frequency (Cherkasova,
  1998, "Improving WWW Proxies Performance with Greedy-Dual-Size-Frequency Caching Policies", after
  Cao and Irani, 1997, "Cost-Aware WWW Proxy Caching Algorithms"). `cost` is what a miss costs:
  the FLOPs to recompute the block, which grow with its depth (attention over the prefix before
  it); size is one block for all. L, the "inflation", is raised to each evicted block's priority,
  so blocks not touched for a long time age out even if they were once used often.

The model is sequential: requests are served one after another, each one's blocks pinned while
it is inserted, nothing running concurrently. `PrefixCache.serve(block_names, usable)` returns the
blocks the request found; the counters give the token hit rate and the FLOPs saved.
`exact_scan=True` picks each victim by scanning every leaf (the slow twin the heap is tested against).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

POLICIES = ("lru", "lfu", "gdsf")


@dataclass
class Entry:
    """A cached block: its parent's name (-1 = first block), how many cached children it has,
    how often it was used, when last, what recomputing it costs, its current priority."""
    name: int
    parent: int
    depth: int
    cost: float
    serial: int
    uses: int = 0
    last_use: int = 0
    children: int = 0
    priority: tuple = field(default=())


class PrefixCache:
    """A tree of prefix blocks under a budget of `budget_blocks`, evicting leaves by `policy`.

    `parent_of(name)` gives a block's parent name (kvlab.cluster.sessions.BlockKeys.parent);
    `cost_of(depth)` the cost of recomputing the block at depth `depth` (0 = first), default 1.
    """

    def __init__(self, budget_blocks: int, policy: str = "lru", parent_of=None, cost_of=None,
                 exact_scan: bool = False):
        if budget_blocks < 1:
            raise ValueError(f"budget_blocks must be >= 1, got {budget_blocks}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.budget = budget_blocks
        self.policy = policy
        self.parent_of = parent_of
        self.cost_of = cost_of or (lambda depth: 1.0)
        self.exact_scan = exact_scan
        self.entries: dict[int, Entry] = {}
        self.inflation = 0.0
        self._clock = 0
        self._serial = 0
        self._heap: list = []
        self.queried_tokens = self.hit_tokens = 0
        self.queried_cost = self.hit_cost = 0.0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: int) -> bool:
        return name in self.entries

    @property
    def hit_rate(self) -> float:
        """Fraction of prompt tokens found cached."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    @property
    def cost_saved(self) -> float:
        """Fraction of the looked-up blocks' recompute cost that hits saved."""
        return self.hit_cost / self.queried_cost if self.queried_cost else 0.0

    def match(self, names) -> int:
        """How many leading blocks of `names` are cached (changes nothing)."""
        n = 0
        while n < len(names) and names[n] in self.entries:
            n += 1
        return n

    # ---- priorities and eviction -------------------------------------------------------------
    def _touch(self, e: Entry) -> None:
        e.uses += 1
        e.last_use = self._clock
        if self.policy == "lru":
            e.priority = (e.last_use, e.serial)
        elif self.policy == "lfu":
            e.priority = (e.uses, e.last_use, e.serial)
        else:
            e.priority = (self.inflation + e.uses * e.cost, e.serial)
        if e.children == 0:
            heapq.heappush(self._heap, (e.priority, e.name))

    def _is_victim(self, e: Entry, pinned) -> bool:
        return e.children == 0 and e.name not in pinned

    def _pick_victim(self, pinned) -> Entry | None:
        if self.exact_scan:
            leaves = [e for e in self.entries.values() if self._is_victim(e, pinned)]
            return min(leaves, key=lambda e: e.priority) if leaves else None
        skipped, victim = [], None
        while self._heap:
            prio, name = heapq.heappop(self._heap)
            e = self.entries.get(name)
            if e is None or e.priority != prio or e.children:
                continue                          # stale: evicted, re-touched or no longer a leaf
            if name in pinned:
                skipped.append((prio, name))      # a leaf of the request being inserted: keep
                continue
            victim = e
            break
        for item in skipped:
            heapq.heappush(self._heap, item)
        return victim

    def _evict_one(self, pinned) -> bool:
        e = self._pick_victim(pinned)
        if e is None:
            return False
        del self.entries[e.name]
        self.evictions += 1
        if self.policy == "gdsf":
            self.inflation = max(self.inflation, e.priority[0])
        if e.parent >= 0:
            p = self.entries[e.parent]
            p.children -= 1
            if p.children == 0:
                heapq.heappush(self._heap, (p.priority, p.name))
        return True

    # ---- the request interface -----------------------------------------------------------------
    def serve(self, names, usable: int | None = None, block_size: int = 1,
              prompt_tokens: int | None = None) -> int:
        """One request: look up its first `usable` blocks (default all), count hits, then cache all
        of `names` (its prompt and output blocks), evicting leaves as needed. Blocks that do not
        fit even after evicting everything else are not cached. Returns the blocks found.
        `prompt_tokens` (default usable x block_size) is what the hit rate divides by."""
        names = list(names)
        usable = len(names) if usable is None else usable
        if not 0 <= usable <= len(names):
            raise ValueError(f"usable must be in [0, {len(names)}], got {usable}")
        queried = usable * block_size if prompt_tokens is None else prompt_tokens
        if queried < usable * block_size:
            raise ValueError(f"prompt_tokens ({prompt_tokens}) must cover the usable blocks "
                             f"({usable} x {block_size} tokens)")
        self._clock += 1
        hit = self.match(names[:usable])
        self.queried_tokens += queried
        self.hit_tokens += hit * block_size
        for d in range(usable):
            c = self.cost_of(d)
            self.queried_cost += c
            self.hit_cost += c if d < hit else 0.0
        pinned = set()
        for d, name in enumerate(names):
            pinned.add(name)
            e = self.entries.get(name)
            if e is None:
                if len(self.entries) >= self.budget and not self._evict_one(pinned):
                    break
                parent = names[d - 1] if d else -1
                if self.parent_of is not None and self.parent_of[name] != parent:
                    raise ValueError(f"block {name} follows {parent}, but its parent is {self.parent_of[name]}")
                self._serial += 1
                e = self.entries[name] = Entry(name, parent, d, float(self.cost_of(d)), self._serial)
                if parent >= 0:
                    self.entries[parent].children += 1
            self._touch(e)
        return hit

    def check(self) -> None:
        """Assert the invariants: within budget, every cached block's parent cached, child counts right."""
        assert len(self.entries) <= self.budget, (len(self.entries), self.budget)
        counts: dict[int, int] = {}
        for e in self.entries.values():
            if e.parent >= 0:
                assert e.parent in self.entries, f"block {e.name} cached without its parent {e.parent}"
                counts[e.parent] = counts.get(e.parent, 0) + 1
        for e in self.entries.values():
            assert e.children == counts.get(e.name, 0), (e.name, e.children, counts.get(e.name, 0))


def block_cost_flops(config, block_size: int):
    """cost_of(depth) for a model: FLOPs to recompute block `depth` (weights and attention over the
    depth x block_size tokens before it), from `kvlab.costs.forward_cost.forward_cost`."""
    from kvlab.costs.forward_cost import forward_cost

    def cost_of(depth: int) -> float:
        return forward_cost(config, block_size, depth * block_size, logit_rows=0).flops
    return cost_of


def simulate(trace, budget_blocks: int, policy: str, block_size: int = 16, config=None,
             exact_scan: bool = False) -> PrefixCache:
    """Serve a chat trace (kvlab.cluster.sessions) in arrival order through one cache; return it.
    Each request looks up its prompt's full blocks, less the last token (always computed), and
    caches its prompt and output blocks. `config` (a model) sets GDSF's recompute cost."""
    from kvlab.cluster.sessions import BlockKeys

    keys = BlockKeys(block_size)
    cost_of = _memo(block_cost_flops(config, block_size)) if config is not None else None
    cache = PrefixCache(budget_blocks, policy, parent_of=keys.parent, cost_of=cost_of,
                        exact_scan=exact_scan)
    for r in sorted(trace, key=lambda r: r.arrival_time):
        cache.serve(keys.of(r.tokens), usable=(r.prompt_len - 1) // block_size, block_size=block_size,
                    prompt_tokens=r.prompt_len)
    return cache


def _memo(f):
    table: dict[int, float] = {}

    def g(d: int) -> float:
        if d not in table:
            table[d] = f(d)
        return table[d]
    return g
