"""Offloading KV blocks to CPU memory and SSD, and when reloading a prefix beats recomputing it.

HBM is small: an H100 has 80 GB, while a DGX H100 has 2 TB of DRAM and 30 TB of NVMe behind it
(`kvlab.cluster.hardware`). A block evicted from HBM can be copied down instead of dropped, and
copied back when a request needs it: Mooncake (Qin et al., 2024, "Mooncake: A KVCache-centric
Disaggregated Architecture for LLM Serving") builds its serving system around such a pool of CPU
memory and SSD. The question for each request is whether the copy back is cheaper than simply
prefilling those tokens again.

**The break-even.** Recomputing a prefix of n tokens costs the prefill FLOPs
(`kvlab.costs.flops`): 2 x W x n for the matmul weights W plus 2 x H x D x L x n (n + 1) for causal
attention (H query heads of size D, L layers), at `mfu` x peak FLOP/s. It is counted as FLOPs only:
the recomputed tokens ride in a prefill that reads the weights anyway. Reloading costs
latency + n x (KV bytes per token) / bandwidth. Per token, recompute grows with n (attention),
reload does not, so reload wins from some n* on: `break_even_tokens` solves the quadratic;
`break_even_tokens_scan` is its slow twin (try every n). Everything is a model: peak numbers,
no overlap of copy and compute, no queueing on the link.

**The tiered store.** `TieredStore` keeps blocks in tiers (0 = HBM, then e.g. DRAM, SSD), each an
LRU list with a capacity in blocks; a block lives in one tier at a time (exclusive). A block
pushed out of tier i moves to the front of tier i + 1; out of the last tier it is gone. Each
request's found prefix is split where it pays: blocks up to a cut k are used (reloaded from their
tier), the rest recomputed, k chosen to minimise the modelled time. Then all the request's blocks
move to HBM (deepest first, so a prefix ages no faster than its continuation).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from kvlab.cluster.hardware import Link
from kvlab.costs.flops import weight_split
from kvlab.costs.forward_cost import forward_cost
from kvlab.costs.memory import as_kv_config, kv_bytes_per_token


def _check(config, machine, mfu):
    cfg = as_kv_config(config)
    if cfg.sliding_layers:
        raise ValueError(f"{cfg.name}: sliding-window layers are not modelled here (sliding_layers="
                         f"{cfg.sliding_layers}); pass a full-attention model")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if not machine.peak_flops > 0:
        raise ValueError(f"machine.peak_flops must be > 0, got {machine.peak_flops}")
    return cfg


def recompute_seconds(config, tokens: int, machine, mfu: float = 1.0, context: int = 0) -> float:
    """Seconds of compute to prefill `tokens` tokens after `context` cached ones: their FLOPs (no
    logits) at mfu x machine.peak_flops."""
    cfg = _check(config, machine, mfu)
    if tokens < 0 or context < 0:
        raise ValueError(f"tokens and context must be >= 0, got tokens={tokens}, context={context}")
    if tokens == 0:
        return 0.0
    return forward_cost(cfg, tokens, context, logit_rows=0).flops / (machine.peak_flops * mfu)


def reload_seconds(config, tokens: int, link: Link, dtype_bytes: float = 2) -> float:
    """Seconds to copy the K/V of `tokens` tokens over `link` (latency once, then bytes / bandwidth)."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return link.seconds(tokens * kv_bytes_per_token(config, dtype_bytes))


def break_even_tokens(config, link: Link, machine, mfu: float = 1.0, dtype_bytes: float = 2) -> int:
    """Smallest prefix length n >= 1 with reload_seconds(n) <= recompute_seconds(n).

    With F = mfu x peak, a = 2 H D L / F, b = (2 W + 2 H D L) / F - bytes_per_token / bandwidth,
    reload wins iff a n^2 + b n >= latency; the smallest such integer is the ceiling of the positive
    root (1 if n = 1 already satisfies it)."""
    cfg = _check(config, machine, mfu)
    f = machine.peak_flops * mfu
    body, _ = weight_split(cfg)
    hdl = cfg.num_heads * cfg.head_dim * cfg.num_layers
    a = 2 * hdl / f
    b = (2 * body + 2 * hdl) / f - kv_bytes_per_token(cfg, dtype_bytes) / link.bandwidth
    lat = link.latency
    wins = lambda n: reload_seconds(cfg, n, link, dtype_bytes) <= recompute_seconds(cfg, n, machine, mfu)  # noqa: E731
    if wins(1):
        return 1
    n = max(1, math.ceil((-b + math.sqrt(b * b + 4 * a * lat)) / (2 * a)))
    while n > 1 and wins(n - 1):            # float rounding around the root: settle on the exact integer
        n -= 1
    while not wins(n):
        n += 1
    return n


def break_even_tokens_scan(config, link: Link, machine, mfu: float = 1.0, dtype_bytes: float = 2,
                           limit: int = 10**6) -> int | None:
    """The slow twin: try n = 1, 2, ... up to `limit` with the cost functions themselves."""
    for n in range(1, limit + 1):
        if reload_seconds(config, n, link, dtype_bytes) <= recompute_seconds(config, n, machine, mfu):
            return n
    return None


@dataclass
class TierStats:
    """What a TieredStore served: prompt tokens, tokens reused from each tier, modelled seconds."""
    requests: int = 0
    prompt_tokens: int = 0
    tokens_from: list = field(default_factory=list)   # tokens reused per tier
    prefill_seconds: float = 0.0      # modelled: reloads + recompute, summed over requests
    no_cache_seconds: float = 0.0     # modelled: every prompt prefilled from scratch


class TieredStore:
    """Exclusive LRU tiers of prefix blocks: `capacities[i]` blocks in tier i, `links[i - 1]` the
    link tier i is reloaded over (tier 0 is HBM, read in place)."""

    def __init__(self, capacities, links, config, machine, block_size: int = 16, mfu: float = 1.0,
                 dtype_bytes: float = 2):
        if not capacities or any(c < 1 for c in capacities):
            raise ValueError(f"capacities must be a non-empty list of blocks >= 1, got {capacities}")
        if len(links) != len(capacities) - 1:
            raise ValueError(f"need one link per tier below HBM: {len(capacities) - 1}, got {len(links)}")
        self.capacities, self.links = list(capacities), list(links)
        self.cfg = _check(config, machine, mfu)
        self.machine, self.mfu, self.block_size, self.dtype_bytes = machine, mfu, block_size, dtype_bytes
        self.tiers = [OrderedDict() for _ in capacities]      # name -> None, LRU first
        self.where: dict[int, int] = {}                       # name -> tier
        self.block_reload = [0.0] + [reload_seconds(self.cfg, block_size, k, dtype_bytes) for k in links]
        self.stats = TierStats(tokens_from=[0] * len(capacities))

    def _put(self, name: int, tier: int) -> None:
        """Insert at the MRU end of `tier`, cascading LRU blocks downwards."""
        while tier < len(self.tiers):
            t = self.tiers[tier]
            t[name] = None
            self.where[name] = tier
            if len(t) <= self.capacities[tier]:
                return
            name, _ = t.popitem(last=False)
            tier += 1
        del self.where[name]

    def _remove(self, name: int) -> None:
        del self.tiers[self.where.pop(name)][name]

    def found(self, names) -> list[int]:
        """The tier of each leading block of `names` that is stored somewhere."""
        out = []
        for n in names:
            if n not in self.where:
                break
            out.append(self.where[n])
        return out

    def best_cut(self, tiers_found, prompt_len: int) -> tuple[int, float]:
        """(k, seconds): use the first k found blocks, recompute the rest of the prompt; the k with
        the least modelled time (ties: the larger k)."""
        bs, best = self.block_size, None
        reload = 0.0
        for k in range(len(tiers_found) + 1):
            if k:
                reload += self.block_reload[tiers_found[k - 1]]
            t = reload + recompute_seconds(self.cfg, prompt_len - k * bs, self.machine, self.mfu, k * bs)
            if best is None or t <= best[1]:
                best = (k, t)
        return best

    def serve(self, names, usable: int, prompt_len: int) -> int:
        """One request: pick the cut, count tokens per tier and modelled seconds, then store every
        block of `names` in HBM. Returns the cut k."""
        tiers_found = self.found(names[:usable])
        k, seconds = self.best_cut(tiers_found, prompt_len)
        s = self.stats
        s.requests += 1
        s.prompt_tokens += prompt_len
        for t in tiers_found[:k]:
            s.tokens_from[t] += self.block_size
        s.prefill_seconds += seconds
        s.no_cache_seconds += recompute_seconds(self.cfg, prompt_len, self.machine, self.mfu)
        for name in reversed(names):
            if name in self.where:
                self._remove(name)
            self._put(name, 0)
        return k

    def check(self) -> None:
        for i, t in enumerate(self.tiers):
            assert len(t) <= self.capacities[i], (i, len(t), self.capacities[i])
            assert all(self.where[n] == i for n in t)
        assert len(self.where) == sum(len(t) for t in self.tiers)


def simulate_tiers(trace, capacities, links, config, machine, block_size: int = 16,
                   mfu: float = 1.0) -> TieredStore:
    """Serve a chat trace (kvlab.cluster.sessions) in arrival order through a TieredStore."""
    from kvlab.cluster.sessions import BlockKeys

    keys = BlockKeys(block_size)
    store = TieredStore(capacities, links, config, machine, block_size, mfu)
    for r in sorted(trace, key=lambda r: r.arrival_time):
        store.serve(keys.of(r.tokens), (r.prompt_len - 1) // block_size, r.prompt_len)
    return store
