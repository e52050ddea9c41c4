"""Routing requests over N engine replicas, each with its own prefix cache.

One GPU's prefix cache (chapter 08) helps only the requests that reach it. With N replicas behind
a router, where a request goes decides whether its system prompt and its conversation's history
are found: round-robin spreads a session's turns over all replicas, so each replica caches every
prefix and finds only a fraction; sending a request where its longest prefix is cached finds the
most, but can pile popular prefixes onto one replica. Open-source routers (SGLang's router, NVIDIA
Dynamo's KV router) route by cached prefix with a load check, the multi-replica form of the
prefix-first scheduling of one engine in Zheng et al., 2024, "SGLang"; Mooncake's scheduler weighs
prefix reuse against queueing (Qin et al., 2024, "Mooncake"); Preble (Srivatsa et al., 2024,
"Preble: Efficient Distributed Prompt Scheduling for LLM Serving") studies the trade-off.

Policies (`ROUTERS`):
- `round_robin`: replica i mod N for the i-th request;
- `least_loaded`: the replica with the least outstanding work (ties: the first from replica
  index mod N on, so that idle replicas take turns);
- `prefix_hash`: a hash of the request's first block (the system prompt) mod N, no load check;
- `prefix_aware`: among replicas whose outstanding work is at most `load_bound` x the mean (the
  new request's work included, so the least loaded replica always qualifies; after Mirrokni,
  Thorup and Zadimoghaddam, 2018, "Consistent Hashing with Bounded Loads"), the one holding the
  longest cached prefix; ties: least loaded, then as `least_loaded`.

**The model.** A replica is a single FIFO server over *work seconds*: a request's work is its
modelled prefill time (`kvlab.cluster.offload.recompute_seconds` for the tokens its cache does not
hold) plus `output_len x decode_seconds_per_token`, the per-sequence share of a batched decode
step. Its time to first token is the wait for the replica's backlog plus its prefill. The router
sees each replica's cache exactly (a real router keeps an approximate copy). Each replica's cache
is a `kvlab.cluster.eviction.PrefixCache` (LRU) of `budget_blocks`. A model, not a measurement.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvlab.cluster.eviction import PrefixCache
from kvlab.cluster.offload import recompute_seconds
from kvlab.cluster.sessions import BlockKeys

ROUTERS = ("round_robin", "least_loaded", "prefix_hash", "prefix_aware")


@dataclass
class RoutingResult:
    """Per request: the replica, the tokens found cached, the wait and the TTFT (seconds)."""
    policy: str
    num_replicas: int
    replica: list = field(default_factory=list)
    hit_tokens: list = field(default_factory=list)
    prompt_tokens: list = field(default_factory=list)
    wait: list = field(default_factory=list)
    ttft: list = field(default_factory=list)
    work: list = field(default_factory=list)      # work seconds assigned to each replica

    @property
    def hit_rate(self) -> float:
        return sum(self.hit_tokens) / sum(self.prompt_tokens)

    @property
    def imbalance(self) -> float:
        """Work of the busiest replica over the mean (1.0 = perfectly even)."""
        return max(self.work) / (sum(self.work) / len(self.work))

    def requests_per_replica(self) -> list[int]:
        return np.bincount(self.replica, minlength=self.num_replicas).tolist()

    def summary(self) -> dict:
        t = np.asarray(self.ttft)
        return {"policy": self.policy, "hit_rate": self.hit_rate, "imbalance": self.imbalance,
                "ttft_mean": float(t.mean()), "ttft_p50": float(np.median(t)),
                "ttft_p99": float(np.percentile(t, 99)), "total_work": float(sum(self.work))}


def choose_replica(policy: str, index: int, matches, backlogs, first_block: int, new_work: float,
                   load_bound: float = 1.25) -> int:
    """The replica a router picks for the `index`-th request, from what it sees: `matches[i]`
    (leading blocks replica i holds), `backlogs[i]` (its outstanding work, seconds), the name of
    the request's first block, and an estimate of the request's own work."""
    n = len(backlogs)
    if n == 0 or len(matches) != n:
        raise ValueError(f"matches and backlogs must be non-empty and equally long, got {len(matches)}, {n}")
    if policy == "round_robin":
        return index % n
    turn = lambda i: (i - index) % n    # noqa: E731  ties rotate, so idle replicas share the work
    if policy == "least_loaded":
        return min(range(n), key=lambda i: (backlogs[i], turn(i)))
    if policy == "prefix_hash":
        return (first_block * 2654435761) % (2**32) % n       # Knuth's multiplicative hash
    if policy == "prefix_aware":
        if not load_bound >= 1:
            raise ValueError(f"load_bound must be >= 1, got {load_bound}")
        cap = load_bound * (sum(backlogs) + new_work) / n
        eligible = [i for i in range(n) if backlogs[i] <= cap]
        return min(eligible, key=lambda i: (-matches[i], backlogs[i], turn(i)))
    raise ValueError(f"policy must be one of {ROUTERS}, got {policy!r}")


def route_trace(trace, num_replicas: int, policy: str, config, machine, budget_blocks: int = 2048,
                block_size: int = 16, mfu: float = 1.0, decode_seconds_per_token: float = 0.0,
                load_bound: float = 1.25) -> RoutingResult:
    """Route a chat trace (kvlab.cluster.sessions, in arrival order) over `num_replicas` replicas."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if policy not in ROUTERS:
        raise ValueError(f"policy must be one of {ROUTERS}, got {policy!r}")
    if decode_seconds_per_token < 0:
        raise ValueError(f"decode_seconds_per_token must be >= 0, got {decode_seconds_per_token}")
    keys = BlockKeys(block_size)
    caches = [PrefixCache(budget_blocks, "lru", parent_of=keys.parent) for _ in range(num_replicas)]
    free_at = [0.0] * num_replicas
    res = RoutingResult(policy, num_replicas, work=[0.0] * num_replicas)
    full_prefill = {}
    for i, r in enumerate(sorted(trace, key=lambda r: r.arrival_time)):
        names = keys.of(r.tokens)
        usable = (r.prompt_len - 1) // block_size
        matches = [c.match(names[:usable]) for c in caches]
        backlogs = [max(0.0, f - r.arrival_time) for f in free_at]
        if r.prompt_len not in full_prefill:
            full_prefill[r.prompt_len] = recompute_seconds(config, r.prompt_len, machine, mfu)
        estimate = full_prefill[r.prompt_len] + r.output_len * decode_seconds_per_token
        k = choose_replica(policy, i, matches, backlogs, names[0] if names else -1, estimate, load_bound)
        hit = caches[k].serve(names, usable, block_size, prompt_tokens=r.prompt_len) * block_size
        prefill = recompute_seconds(config, r.prompt_len - hit, machine, mfu, context=hit)
        work = prefill + r.output_len * decode_seconds_per_token
        start = max(r.arrival_time, free_at[k])
        free_at[k] = start + work
        res.replica.append(k)
        res.hit_tokens.append(hit)
        res.prompt_tokens.append(r.prompt_len)
        res.wait.append(start - r.arrival_time)
        res.ttft.append(start - r.arrival_time + prefill)
        res.work[k] += work
    return res


def decode_seconds_per_token(config, machine, batch: int, context: int, dtype_bytes: float = 2) -> float:
    """One sequence's share of a decode step on `machine`: the roofline time of a step of `batch`
    sequences of `context` tokens (`kvlab.costs.forward_cost`), divided by `batch`."""
    from kvlab.costs.forward_cost import forward_cost

    if batch < 1 or context < 0:
        raise ValueError(f"batch must be >= 1 and context >= 0, got batch={batch}, context={context}")
    c = forward_cost(config, 1, context, batch, weight_dtype_bytes=dtype_bytes, kv_dtype_bytes=dtype_bytes)
    return c.floor_seconds(machine) / batch
