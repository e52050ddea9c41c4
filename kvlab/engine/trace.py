"""Watch the engine work: one record per step of what the scheduler chose, where each new token's
K/V went, and what the block pool and the queues looked like.

    tracer = EngineTracer(llm)          # attach: swaps in a runner that records each step
    rec = tracer.step()                 # one llm.step(), returned as a StepRecord
    print(rec.describe())
    tracer.detach()                     # the original runner is back

Attaching replaces `llm.runner` by a `TracingRunner`, a `ModelRunner` whose `prepare` also hands
what it prepared to a callback. Nothing else in the engine changes, so the tokens are the same
(tests/test_engine_trace.py checks it). Every forward pass the engine runs while attached is
recorded, also those driven by `llm.generate` or `kvlab.lab.batching.serve`; those records carry the
state *before* the forward (schedule, block tables, slots, pool, queues). `tracer.step()` also fills
in what the step produced: the sampled tokens, the finished requests and the free blocks after it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvlab.engine.model_runner import ModelRunner, _spans


@dataclass
class ScheduledSeq:
    """One sequence in one step: it computes the K/V of positions [start, end)."""
    request_id: str
    phase: str                 # "prefill" (prompt, or prompt + output after a preemption) or "decode"
    start: int                 # first position computed this step (= prefix-cache hit at admission)
    end: int                   # tokens in the cache after the step (the context length)
    num_cached_tokens: int     # prompt tokens found in the prefix cache when it was admitted
    block_table: list[int]     # physical block of each logical block
    slots: list[int]           # physical slot of each new token: block * block_size + offset

    @property
    def num_new_tokens(self) -> int:
        return self.end - self.start


@dataclass
class StepRecord:
    step: int
    time: float                          # time.perf_counter() when the forward was prepared
    seqs: list[ScheduledSeq]
    is_decode: bool                      # every sequence computes one token (the decode kernel runs)
    num_free_blocks: int                 # after scheduling: this step's blocks are taken
    num_blocks: int
    num_running: int
    num_waiting: int
    num_preemptions: int                 # so far (the scheduler's counter)
    # filled by EngineTracer.step() after the forward:
    tokens: dict[str, int] = field(default_factory=dict)        # request_id -> sampled token
    finished: dict[str, str] = field(default_factory=dict)      # request_id -> finish reason
    num_free_blocks_after: int | None = None                    # once finished requests let go

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of blocks referenced during the forward (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def describe(self, show_slots: int = 6, show_tokens: bool = True) -> str:
        """A few lines a person can read: the step, then one line per scheduled sequence (at most
        `show_slots` of its slots, and the token it sampled unless show_tokens is False)."""
        kind = "decode" if self.is_decode else "mixed" if any(s.phase == "decode" for s in self.seqs) \
            else "prefill"
        after = "" if self.num_free_blocks_after is None else f" -> {self.num_free_blocks_after} after"
        n = self.num_batched_tokens
        lines = [f"step {self.step} ({kind}, {n} token{'' if n == 1 else 's'}): running {self.num_running}, "
                 f"waiting {self.num_waiting}, free blocks {self.num_free_blocks}/{self.num_blocks}{after}, "
                 f"preemptions {self.num_preemptions}"]
        for s in self.seqs:
            slots = s.slots if len(s.slots) <= show_slots else \
                [*s.slots[:show_slots // 2], "...", *s.slots[-(show_slots - show_slots // 2):]]
            hit = f", cache hit {s.num_cached_tokens}" if s.phase == "prefill" and s.num_cached_tokens else ""
            tok = f" -> token {self.tokens[s.request_id]}" if show_tokens and s.request_id in self.tokens else ""
            fin = f" [{self.finished[s.request_id]}]" if s.request_id in self.finished else ""
            lines.append(f"  {s.request_id}: {s.phase} positions {s.start}..{s.end - 1}{hit}, "
                         f"blocks {s.block_table}, slots {slots}{tok}{fin}".replace("'...'", "..."))
        return "\n".join(lines)


class TracingRunner(ModelRunner):
    """A ModelRunner that passes every prepared step to `on_prepare(items, metadata)`."""

    def __init__(self, model, cache, on_prepare):
        super().__init__(model, cache)
        self.on_prepare = on_prepare

    def prepare(self, items):
        out = super().prepare(items)
        self.on_prepare(items, out[2])
        return out


class EngineTracer:
    """Record every step of `llm` (a kvlab.LLM) from now until `detach()`; a context manager too."""

    def __init__(self, llm):
        if isinstance(llm.runner, TracingRunner):
            raise ValueError("this LLM already has a tracer attached; detach it first")
        self.llm = llm
        self.records: list[StepRecord] = []
        self._original = llm.runner
        llm.runner = TracingRunner(llm.model, llm.cache, self._record)

    def _record(self, items, meta) -> None:
        llm, bs = self.llm, self.llm.block_size
        qsl = meta.query_start_loc.tolist()
        slots = meta.slot_mapping.tolist()
        rows = []
        for i, (seq, start, end) in enumerate(_spans(items)):
            admitted = end - start > 1 or start == seq.num_cached_tokens   # prompt (or a chunk of it)
            rows.append(ScheduledSeq(seq.request_id, "prefill" if admitted else "decode", start, end,
                                     seq.num_cached_tokens, list(seq.block_table), slots[qsl[i]:qsl[i + 1]]))
            assert all(s // bs == seq.block_table[p // bs] for p, s in zip(range(start, end), rows[-1].slots))
        sch, bm = llm.scheduler, llm.block_manager
        self.records.append(StepRecord(len(self.records), time.perf_counter(), rows, bool(meta.is_decode),
                                       bm.num_free_blocks, bm.num_blocks, len(sch.running),
                                       len(sch.waiting), sch.num_preemptions))

    def step(self) -> StepRecord | None:
        """Run one llm.step(); its record with the tokens it produced, or None if nothing ran."""
        before = len(self.records)
        outs = self.llm.step()
        if len(self.records) == before:
            return None
        rec = self.records[-1]
        rec.tokens = {o.request_id: o.new_token_ids[-1] for o in outs if o.new_token_ids}
        rec.finished = {o.request_id: o.outputs[0].finish_reason for o in outs if o.finished}
        rec.num_free_blocks_after = self.llm.block_manager.num_free_blocks
        return rec

    def detach(self) -> None:
        if self.llm.runner is not self._original:
            self.llm.runner = self._original

    def __enter__(self) -> EngineTracer:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
