"""Prefill/decode disaggregation vs colocated serving: a discrete-event model.

A colocated engine runs prefills and decodes on the same GPU. A long prefill takes tens of
milliseconds of compute; every running sequence waits for it, so the time between output tokens
(TPOT) jumps whenever a new request is admitted. DistServe (Zhong et al., 2024, "DistServe:
Disaggregating Prefill and Decoding for Goodput-optimized Large Language Model Serving") and
Splitwise (Patel et al., 2024, "Splitwise: Efficient Generative LLM Inference Using Phase
Splitting") put the two phases on different GPUs and ship each request's KV cache from the prefill
GPU to a decode GPU; Mooncake (Qin et al., 2024) does the same at scale. Chunked prefill
(Agrawal et al., 2024, "Taming Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve")
is the colocated answer: each step carries all decodes plus a bounded slice of prefill.

**Modes** (`simulate`):
- `colocated`: N GPUs, requests dealt round-robin; each step is either a prefill of waiting
  requests (up to `max_prefill_tokens`, at least one request; prefills first, as vLLM's original
  scheduler) or one decode token for every running sequence;
- `chunked`: colocated, each step = every running decode + up to `max_prefill_tokens` minus the
  decodes of prompt tokens from the waiting queue (a prompt may span steps);
- `disagg`: `num_prefill` GPUs prefill (FCFS batches), then each request's KV (prompt tokens x
  KV bytes per token) crosses `link` (one transfer at a time per prefill GPU), then joins the
  decode GPU with the fewest sequences, which runs decode-only steps.

**Step time** is the roofline of the whole step (`step_seconds`): max(FLOPs / (mfu x peak), bytes /
(mbu x bandwidth)), with the FLOPs and bytes of `kvlab.costs.forward_cost` (weights read once per step,
KV read per sequence; FLOPs as `kvlab.costs.flops` counts them). `step_seconds_reference` sums
`forward_cost` calls, its slow twin. No KV capacity limit besides `max_batch` sequences per GPU, no
CPU overheads: a model, not a measurement.
The first token comes out of the prefill step (TTFT); TPOT is the mean gap between later tokens.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from kvlab.cluster.hardware import Link
from kvlab.costs.flops import weight_split
from kvlab.costs.forward_cost import forward_cost
from kvlab.costs.memory import as_kv_config, kv_bytes_per_token

MODES = ("colocated", "chunked", "disagg")


@dataclass(frozen=True)
class CostModel:
    """Per-step costs of a model on a machine (dtype: 2 bytes for weights and KV)."""
    config: object
    machine: object
    mfu: float = 0.5     # fraction of peak FLOP/s a step reaches: an assumption, not a datasheet number
    mbu: float = 0.8     # fraction of peak bandwidth: likewise

    def __post_init__(self):
        cfg = as_kv_config(self.config)
        if cfg.sliding_layers:
            raise ValueError(f"{cfg.name}: sliding-window layers are not modelled here")
        for name in ("mfu", "mbu"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        body, head = weight_split(cfg)
        object.__setattr__(self, "_c", (body, head, cfg.num_heads * cfg.head_dim * cfg.num_layers,
                                        kv_bytes_per_token(cfg), forward_cost(cfg, 1).weight_bytes))

    def step_seconds(self, chunks=(), decode_contexts=()) -> float:
        """One step: prefill `chunks` = [(new tokens, tokens already cached), ...] (one logit row each)
        and one decode token for each context in `decode_contexts`."""
        body, head, hdl, bpt, wbytes = self._c
        flops, kv = 0.0, 0.0
        for n, c in chunks:
            flops += 2 * body * n + 2 * head + 4 * hdl * (n * c + n * (n + 1) // 2)
            kv += bpt * (c + n)
        b = len(decode_contexts)
        if b:
            s = float(np.sum(decode_contexts))
            flops += b * (2 * body + 2 * head) + 4 * hdl * (s + b)
            kv += bpt * (s + b)
        if not chunks and not b:
            return 0.0
        m = self.machine
        return max(flops / (self.mfu * m.peak_flops), (wbytes + kv) / (self.mbu * m.bandwidth))

    def step_seconds_reference(self, chunks=(), decode_contexts=()) -> float:
        """The slow twin: the same step from `kvlab.costs.forward_cost.forward_cost`, one call per sequence."""
        costs = [forward_cost(self.config, n, c) for n, c in chunks]
        costs += [forward_cost(self.config, 1, c) for c in decode_contexts]
        if not costs:
            return 0.0
        flops = sum(c.flops for c in costs)
        kv = sum(c.kv_read_bytes + c.kv_write_bytes for c in costs)
        m = self.machine
        return max(flops / (self.mfu * m.peak_flops), (costs[0].weight_bytes + kv) / (self.mbu * m.bandwidth))


@dataclass
class _Req:
    r: object
    prefilled: int = 0
    generated: int = 0
    first: float = -1.0
    last: float = -1.0
    max_gap: float = 0.0

    def token(self, t: float) -> None:
        self.generated += 1
        if self.first < 0:
            self.first = t
        else:
            self.max_gap = max(self.max_gap, t - self.last)
        self.last = t


@dataclass
class _Gpu:
    role: str                    # "both", "prefill" or "decode"
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    busy: bool = False
    link_free: float = 0.0
    steps: int = 0
    busy_time: float = 0.0


@dataclass
class DisaggResult:
    """Per request (trace order): TTFT, TPOT (nan for one-token outputs), longest gap between two
    tokens, end-to-end latency; and each GPU's busy fraction."""
    mode: str
    ttft: np.ndarray
    tpot: np.ndarray
    max_gap: np.ndarray
    e2e: np.ndarray
    utilization: list

    def summary(self) -> dict:
        out = {"mode": self.mode}
        for name in ("ttft", "tpot", "max_gap"):
            v = getattr(self, name)
            v = v[~np.isnan(v)]
            out |= {f"{name}_p50": float(np.median(v)), f"{name}_p99": float(np.percentile(v, 99))}
        return out


def simulate(trace, mode: str, cost: CostModel, num_gpus: int = 2, num_prefill: int = 1,
             link: Link | None = None, max_prefill_tokens: int = 4096, max_batch: int = 256) -> DisaggResult:
    """Run `trace` (kvlab.lab.traces.Request: arrival_time, prompt_len, output_len) through `mode`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if num_gpus < 1 or (mode == "disagg" and not 1 <= num_prefill < num_gpus):
        raise ValueError(f"need num_gpus >= 1 and, for disagg, 1 <= num_prefill < num_gpus; got "
                         f"num_gpus={num_gpus}, num_prefill={num_prefill}")
    if mode == "disagg" and link is None:
        raise ValueError("mode='disagg' needs the link the KV cache crosses (kvlab.cluster.hardware.LINKS)")
    if max_prefill_tokens < 1 or max_batch < 1:
        raise ValueError(f"max_prefill_tokens and max_batch must be >= 1, got {max_prefill_tokens}, {max_batch}")
    gpus = ([_Gpu("prefill") for _ in range(num_prefill)] + [_Gpu("decode") for _ in range(num_gpus - num_prefill)]
            if mode == "disagg" else [_Gpu("both") for _ in range(num_gpus)])
    reqs = [_Req(r) for r in trace]
    events: list = []           # (time, order, kind, gpu index, payload)
    order = iter(range(1 << 62))

    def push(t, kind, g, payload=None):
        heapq.heappush(events, (t, next(order), kind, g, payload))

    entry = [i for i, g in enumerate(gpus) if g.role != "decode"]
    for i, q in enumerate(reqs):
        push(q.r.arrival_time, "arrive", entry[i % len(entry)], q)

    def start(gi, now):
        g = gpus[gi]
        if g.busy:
            return
        plan = []
        decodes = g.running if g.role != "prefill" else []
        if g.role == "prefill" or (mode == "colocated" and g.waiting and len(g.running) < max_batch):
            decodes, budget = [], max_prefill_tokens
            while g.waiting and (not plan or g.waiting[0].r.prompt_len <= budget) and \
                    (g.role == "prefill" or len(g.running) + len(plan) < max_batch):
                q = g.waiting.popleft()
                plan.append((q, q.r.prompt_len))
                budget -= q.r.prompt_len
        elif mode == "chunked":
            budget = max_prefill_tokens - len(decodes)
            while g.waiting and budget > 0 and len(g.running) + len(plan) < max_batch:
                q = g.waiting[0]
                n = min(q.r.prompt_len - q.prefilled, budget)
                plan.append((q, n))
                budget -= n
                if q.prefilled + n == q.r.prompt_len:
                    g.waiting.popleft()
                else:
                    break
        chunks = [(n, q.prefilled) for q, n in plan]
        ctx = [q.r.prompt_len + q.generated - 1 for q in decodes]
        dt = cost.step_seconds(chunks, ctx)
        if dt == 0.0:
            return
        g.busy, g.steps, g.busy_time = True, g.steps + 1, g.busy_time + dt
        push(now + dt, "done", gi, (plan, list(decodes)))

    while events:
        now, _, kind, gi, payload = heapq.heappop(events)
        g = gpus[gi]
        if kind == "arrive":
            g.waiting.append(payload)
        elif kind == "kv_in":
            g.running.append(payload)
        else:
            g.busy = False
            plan, decodes = payload
            for q in decodes:
                q.token(now)
            for q, n in plan:
                q.prefilled += n
                if q.prefilled == q.r.prompt_len:
                    q.token(now)                                   # the prefill's logits: token 1
                    if q.generated < q.r.output_len:
                        if g.role == "prefill":
                            dst = min((i for i, d in enumerate(gpus) if d.role == "decode"),
                                      key=lambda i: (len(gpus[i].running), i))
                            g.link_free = max(g.link_free, now) + link.seconds(
                                q.r.prompt_len * cost._c[3])
                            push(g.link_free, "kv_in", dst, q)
                        else:
                            g.running.append(q)
            g.running = [q for q in g.running if q.generated < q.r.output_len]
        start(gi, now)

    end = max(q.last for q in reqs)
    t0 = min(q.r.arrival_time for q in reqs)
    ttft = np.array([q.first - q.r.arrival_time for q in reqs])
    tpot = np.array([(q.last - q.first) / (q.generated - 1) if q.generated > 1 else np.nan for q in reqs])
    gap = np.array([q.max_gap if q.generated > 1 else np.nan for q in reqs])
    e2e = np.array([q.last - q.r.arrival_time for q in reqs])
    assert all(q.generated == q.r.output_len for q in reqs), "a request did not finish"
    span = max(end - t0, 1e-12)
    return DisaggResult(mode, ttft, tpot, gap, e2e, [g.busy_time / span for g in gpus])
