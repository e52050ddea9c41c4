"""Static vs continuous batching: one request trace served through the engine's step loop, two ways.

- **Static batching**: a group of up to `num_slots` waiting requests is admitted together, and the
  next group only after *every* request of the group has finished. A request that finishes early
  leaves its slot idle until the longest one in its group is done, and a request that arrives
  meanwhile waits for the whole group.
- **Continuous batching** (iteration-level scheduling, Yu et al., 2022, "Orca: A Distributed Serving
  System for Transformer-Based Generative Models"): every request is handed to the engine when it
  arrives, and the engine's scheduler admits it at the next step that has a free slot and enough KV
  blocks (Kwon et al., 2023, "Efficient Memory Management for Large Language Model Serving with
  PagedAttention").

Both drive the same engine, `kvlab.LLM`, through `add_request` / `step` / `has_unfinished_requests`,
so the only difference is *when* requests are handed over. Give the engine `max_num_seqs=num_slots`
so both have the same number of decode slots.

Time is the trace's clock: a request exists from its `arrival_time` on. The driver never sleeps:
when the engine has nothing to do it jumps the clock to the next arrival, as if it had waited, so a
trace with idle gaps costs no wall time. Time to first token (TTFT) runs from arrival to the step
that produced the first token; time per output token (TPOT) is the mean gap between the later ones.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from kvlab.lab.traces import Request

MODES = ("static", "continuous")


@dataclass
class RequestTiming:
    request_id: int
    arrival: float               # seconds on the trace clock
    first_token: float
    finish: float
    num_output_tokens: int
    first_step: int              # engine step (0-based) that produced the first token
    finish_step: int             # engine step that produced the last token

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        n = self.num_output_tokens
        return (self.finish - self.first_token) / (n - 1) if n > 1 else float("nan")


@dataclass
class ServeResult:
    """What one serving run measured. `step_*` arrays have one entry per engine step."""
    mode: str
    num_slots: int
    timings: list[RequestTiming]
    outputs: dict                # request_id -> generated token ids
    step_time: np.ndarray        # trace-clock time at the end of each step
    step_active: np.ndarray      # sequences that produced a token in the step
    step_queued: np.ndarray      # requests that had arrived but were not running

    @property
    def idle_slots(self) -> np.ndarray:
        """Per step, slots that were empty although a request was waiting for one."""
        return np.minimum(self.num_slots - self.step_active, self.step_queued)

    def summary(self) -> dict:
        t = self.timings
        makespan = max(x.finish for x in t) - min(x.arrival for x in t)
        tokens = sum(x.num_output_tokens for x in t)
        ttft = np.array([x.ttft for x in t])
        tpot = np.array([x.tpot for x in t if x.num_output_tokens > 1])
        return {
            "mode": self.mode,
            "requests": len(t),
            "output_tokens": tokens,
            "steps": len(self.step_active),
            "makespan_s": makespan,
            "throughput_tok_s": tokens / makespan,
            "ttft_mean_s": float(ttft.mean()),
            "ttft_p90_s": float(np.percentile(ttft, 90)),
            "tpot_mean_s": float(tpot.mean()) if len(tpot) else float("nan"),
            "mean_active_slots": float(self.step_active.mean()),
            "idle_slot_pct": 100.0 * float(self.idle_slots.sum()) / (self.num_slots * len(self.step_active)),
        }


def serve(llm, trace: list[Request], prompts: list, params: list, mode: str = "continuous",
          num_slots: int = 8) -> ServeResult:
    """Serve `trace` on `llm`; `prompts[i]` and `params[i]` (a SamplingParams) belong to `trace[i]`.

    Returns per-request timings and generated tokens, and per-step occupancy. The engine must be
    idle when called, and is idle again when this returns.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if not (len(trace) == len(prompts) == len(params)):
        raise ValueError(f"trace, prompts and params must have one entry per request, got "
                         f"{len(trace)}, {len(prompts)} and {len(params)}")
    if not trace:
        raise ValueError("trace is empty")
    if llm.has_unfinished_requests():
        raise ValueError("the engine still has unfinished requests; serve() needs an idle engine")

    order = sorted(range(len(trace)), key=lambda i: (trace[i].arrival_time, i))
    pending = deque(order)                 # not yet arrived (indices into trace)
    queued: deque[int] = deque()           # arrived, not yet handed to the engine
    engine_ids: dict[str, int] = {}        # the engine's request id -> index
    in_engine: set[int] = set()
    first: dict[int, tuple[float, int]] = {}
    done: dict[int, tuple[float, int, list[int]]] = {}
    step_time, step_active, step_queued = [], [], []
    start, skipped = time.perf_counter(), 0.0
    t0 = trace[order[0]].arrival_time

    def now() -> float:
        return t0 + time.perf_counter() - start + skipped

    while pending or queued or in_engine:
        t = now()
        while pending and trace[pending[0]].arrival_time <= t:
            queued.append(pending.popleft())
        if mode == "continuous" or not in_engine:     # static: a new group only when all are done
            take = len(queued) if mode == "continuous" else min(num_slots, len(queued))
            for _ in range(take):
                i = queued.popleft()
                rid = llm.add_request(prompts[i], params[i], request_id=f"{mode}-{trace[i].request_id}")
                engine_ids[rid] = i
                in_engine.add(i)
        if not in_engine:                              # idle: jump to the next arrival
            skipped += max(0.0, trace[pending[0]].arrival_time - now())
            continue
        num_in_engine = len(in_engine)
        outs = llm.step()
        t = now()
        step = len(step_time)
        for out in outs:
            i = engine_ids[out.request_id]
            first.setdefault(i, (t, step))
            if out.finished:
                done[i] = (t, step, list(out.outputs[0].token_ids))
                in_engine.discard(i)
        step_time.append(t)
        step_active.append(len(outs))
        # waiting: in our queue, or handed over but not scheduled this step (engine queue, preempted)
        step_queued.append(len(queued) + num_in_engine - len(outs))

    timings = [RequestTiming(trace[i].request_id, trace[i].arrival_time, first[i][0], done[i][0],
                             len(done[i][2]), first[i][1], done[i][1]) for i in sorted(done)]
    outputs = {trace[i].request_id: done[i][2] for i in sorted(done)}
    return ServeResult(mode, num_slots, timings, outputs, np.asarray(step_time),
                       np.asarray(step_active, dtype=np.int64), np.asarray(step_queued, dtype=np.int64))


def random_prompts(trace: list[Request], vocab_size: int, seed: int = 0, low: int = 100) -> list[list[int]]:
    """A prompt of `prompt_len` random token ids in [low, vocab_size) per request, seeded.

    Random tokens share no prefix, so a prefix cache cannot shortcut any prefill; ids below `low`
    are skipped because small ids are usually special tokens (SmolLM2's first ids are).
    """
    if not 0 <= low < vocab_size:
        raise ValueError(f"need 0 <= low < vocab_size, got low={low}, vocab_size={vocab_size}")
    rng = np.random.default_rng(seed)
    return [rng.integers(low, vocab_size, size=r.prompt_len).tolist() for r in trace]


def shortest_prompt_first(waiting: list) -> list:
    """A scheduling policy for `kvlab.LLM(scheduling_policy=...)`: the waiting queue ordered by
    prompt length, shortest first, ties in queue order (Python's sort is stable).

    Short prompts are cheap to prefill, so serving them first lowers the mean time to first token;
    the price is that a long prompt can wait behind an endless stream of short ones (starvation).
    """
    return sorted(waiting, key=lambda seq: seq.num_prompt_tokens)
