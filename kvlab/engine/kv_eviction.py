"""Dropping KV entries inside a running sequence: the engine's side of a per-sequence token budget.

`kvlab.LLM(kv_budget_tokens=B, kv_eviction="window" | "streaming" | "h2o" | "snapkv")` keeps at
most B entries per sequence, per layer and KV head, with the selection rules of
kvlab/evict/policy.py (the accuracy twin, kvlab/evict/twin.py, uses the same rules). Who does what:

- the **scheduler** asks `Evictor.plan(seq, block_manager)` for each running sequence before it
  plans a step. The evictor decides whether the sequence is cut this step and to how many entries,
  and the block manager gives it its new block table (`BlockManager.compact` / `drop_leading`);
- the **cache** carries the cut out at the start of the step, before the forward writes anything
  (kvlab/cache/compaction.py): it picks the entries to keep (for h2o and snapkv from the attention
  they received, which it accumulates per slot) and copies them to the front of the new table;
- the **runner** builds the step's metadata in *cache indices*: a sequence that has dropped
  `num_evicted_tokens` entries stores the token at position p at index p - num_evicted_tokens, and
  attends over its `num_computed_tokens - num_evicted_tokens` entries. RoPE still gets the original
  positions (see docs/architecture.md, "KV eviction": why).

**Block-lazy.** A sequence is cut back to B entries once it holds B + block_size entries or more,
so it holds at most ceil(B / block_size) + 1 blocks while decoding and a cut happens once per
block_size decode steps (one copy of at most B entries per layer; none at all for `window`, whose
cut drops whole leading blocks once the kept entries are block-aligned). snapkv cuts once when the
prompt's prefill ends, if the prompt is over the budget, keeping B - window prompt entries chosen by
the observation window's attention pinned, and slides a window of `window` entries after them.

A prefill attends over its whole prompt (with chunked prefill: the kept entries plus the chunk),
as the twin does; the budget binds from the first cut on.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvlab.evict.policy import EvictionConfig


@dataclass
class Compaction:
    """One sequence's cut, carried out by the cache at the start of the step: the entries kept out
    of the `num_entries` that `old_table` held go, in order, to indices 0.. of `new_table`."""
    old_table: list[int]
    new_table: list[int]
    num_entries: int
    num_keep: int
    config: EvictionConfig
    pinned: int                 # leading entries no rule may drop (snapkv's selection once made)
    scored: bool                # choose by the accumulated attention (h2o, snapkv's snap)


class Evictor:
    """The per-sequence budget's planner. Evictor(config) with `config.block_size` the engine's."""

    def __init__(self, config: EvictionConfig):
        self.config = config
        self.needs_scores = config.policy in ("h2o", "snapkv")
        self.num_cuts = 0                    # cuts made (counted once per sequence and cut)
        self.num_evicted_tokens = 0          # entries dropped, summed over sequences

    def score_from(self, seq) -> int | None:
        """The first position of seq whose query's attention is accumulated this step, or None:
        every query for h2o; for snapkv the prompt's last `window` queries, until its snap."""
        if self.config.policy == "h2o":
            return 0
        if self.config.policy == "snapkv" and not seq.kv_snapped:
            return max(len(seq) - self.config.window, 0)
        return None

    def plan(self, seq, block_manager) -> Compaction | None:
        """Cut seq now? Then update its table (through the block manager) and its eviction
        counters, and return the copy the cache must make (None when whole blocks were dropped)."""
        cfg, bs = self.config, block_manager.block_size
        n = seq.num_computed_tokens - seq.num_evicted_tokens
        ready = seq.num_computed_tokens == len(seq) - 1          # its prefill is done
        scored, pinned, keep = False, seq.num_pinned_entries, cfg.budget
        if cfg.policy == "snapkv" and not seq.kv_snapped:
            if not ready:
                return None                  # the observation window is the prompt's end
            seq.kv_snapped = True
            if n <= cfg.budget:
                return None
            scored, pinned = True, 0
        elif n < cfg.budget + bs:
            return None
        elif cfg.policy == "h2o":
            scored = True
        elif cfg.policy == "streaming":
            pinned = min(cfg.num_sinks, n)
        drop = n - keep
        if not scored and pinned == 0 and drop % bs == 0:
            block_manager.drop_leading(seq, drop // bs)         # the kept entries stay in place
            compaction = None
        else:
            if not block_manager.can_compact(seq, keep):
                if scored and cfg.policy == "snapkv":
                    seq.kv_snapped = False   # try the snap again next step
                return None                  # the pool cannot place the copy now: a later step
            old = list(seq.block_table)
            block_manager.compact(seq, keep)
            compaction = Compaction(old, list(seq.block_table), n, keep, cfg, pinned, scored)
        if cfg.policy == "snapkv" and scored:
            seq.num_pinned_entries = cfg.budget - cfg.window
        seq.num_evicted_tokens += drop
        self.num_cuts += 1
        self.num_evicted_tokens += drop
        return compaction


def eviction_config(budget, policy, num_sinks, window, block_size, keep_top=None) -> EvictionConfig | None:
    """The KV budget's EvictionConfig (kvlab/evict/policy.py), or None without a budget."""
    if budget is None:
        if policy is not None:
            raise ValueError(f"kv_eviction={policy!r} needs kv_budget_tokens (the entries a sequence keeps)")
        return None
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(f"kv_budget_tokens must be a positive int, got {budget!r}")
    if window is not None and policy not in ("h2o", "snapkv"):
        raise ValueError(f"kv_eviction_window is the recent window of 'h2o' and 'snapkv', not of {policy!r}")
    if keep_top is not None and (policy not in ("h2o", "snapkv") or not callable(keep_top)):
        raise ValueError(f"kv_eviction_keep_top is a function choosing by scores, for 'h2o' and 'snapkv'; "
                         f"got {type(keep_top).__name__} with kv_eviction={policy!r}")
    return EvictionConfig(policy or "window", budget, num_sinks, window, block_size=block_size,
                          keep_top=keep_top)


def max_blocks_per_sequence(config: EvictionConfig, block_size: int) -> int:
    """Blocks a decoding sequence holds at most under the budget: ceil(B / block_size) + 1."""
    return -(-config.budget // block_size) + 1


def check_combination(config: EvictionConfig, kv_format: str, prefix_cache: str,
                      keep_sink_token: bool) -> None:
    """ValueError naming the option that kv_eviction does not work with."""
    policy = f"kv_eviction={config.policy!r}"
    if kv_format in ("int4", "int2", "codec"):
        what = "a KVFormat object" if kv_format == "codec" else f"kv_cache_dtype={kv_format!r}"
        raise ValueError(f"{policy} moves single tokens between blocks; {what} quantizes keys per "
                         "block (or has a layout the engine cannot move): use 'auto', 'int8' or 'fp8'")
    if keep_sink_token:
        raise ValueError(f"{policy} does not work with keep_sink_token=True (its sink rows follow "
                         "first blocks, which a cut rewrites); for sinks use kv_eviction='streaming'")
    if prefix_cache not in ("hash", "none"):
        raise ValueError(f"{policy} needs the engine's block manager: prefix_cache='hash' or 'none', "
                         f"got {prefix_cache!r}")
    if config.policy in ("h2o", "snapkv") and prefix_cache == "hash":
        raise ValueError(f"{policy} chooses by the attention every prompt token receives, which a "
                         "prefix-cache hit never computes: pass enable_prefix_caching=False")
