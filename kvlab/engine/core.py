"""The engine core: one step of the serving loop, and every request's end, in one place.

    schedule = scheduler.schedule()       # which sequences, which tokens; progress advanced
    logits   = runner.run(schedule)       # one packed forward (the cache's step opens and closes)
    tokens   = sample(logits, ...)        # for the sequences whose chunk reached their end
    append, check stop conditions, finish # here and nowhere else

`kvlab.LLM` (kvlab/engine/llm.py) is the API around it; `EngineCore` knows nothing about text
prompts or RequestOutputs. If the forward raises, the scheduler rolls the step back (its
sequences go back to waiting, nothing of it stays findable in the prefix cache), the cache's step
is closed, and the exception propagates; the engine keeps serving on the next `step()`.

An aborted request is finished at once (its blocks freed) and reported by the next `step()` with
finish reason "abort"; it counts in `num_requests_finished` and `num_requests_aborted`, not in
the latency histograms.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvlab.engine.metrics import EngineMetrics
from kvlab.engine.sampling import sample
from kvlab.engine.sequence import Sequence


@dataclass
class StepOutput:
    """One sequence's news from one step: the tokens it produced (none for an abort)."""
    seq: Sequence
    new_token_ids: list[int]


class EngineCore:
    def __init__(self, scheduler, runner, max_model_len: int, eos_token_id: int | None,
                 tokenizer=None, device="cpu"):
        self.scheduler, self.runner = scheduler, runner
        self.max_model_len, self.eos_token_id = max_model_len, eos_token_id
        self.tokenizer, self.device = tokenizer, device
        self.metrics = EngineMetrics()
        self._generators: dict[int, torch.Generator] = {}
        self._aborted: list[Sequence] = []         # finished by abort, reported by the next step
        self.requests: dict[str, Sequence] = {}    # request_id -> unfinished sequence

    # ---- requests --------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.sampling_params.seed is not None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seq.sampling_params.seed)
            self._generators[seq.seq_id] = g
        self.requests[seq.request_id] = seq
        self.metrics.prompt_tokens += seq.num_prompt_tokens
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self.requests.get(request_id)
        if seq is not None:
            self._finish(seq, "abort", time.perf_counter())
            self._aborted.append(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    # ---- the step --------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Run one step; a StepOutput for each sequence that produced a token or was aborted."""
        outputs = [StepOutput(seq, []) for seq in self._aborted]
        self._aborted = []
        schedule = self.scheduler.schedule()
        if not schedule.items:
            self.runner.release(schedule.freed_blocks)
            if self.scheduler.waiting:
                raise RuntimeError("no request could be scheduled although the engine is idle")
            return outputs
        try:
            logits = self.runner.run(schedule)
        except BaseException:
            self.scheduler.rollback(schedule)
            raise
        seqs = [item.seq for item in schedule.items if item.samples]
        if not seqs:
            return outputs
        tokens = sample(logits, [s.sampling_params for s in seqs],
                        [self._generators.get(s.seq_id) for s in seqs])
        now = time.perf_counter()
        for seq, tok in zip(seqs, tokens):
            seq.append_token(tok)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._stop_reason(seq)
            if reason is not None:
                self._finish(seq, reason, now)
            outputs.append(StepOutput(seq, [tok]))
        self.metrics.generation_tokens += len(seqs)
        self.runner.release(self.scheduler.take_events())   # the finished let go of their rows
        return outputs

    # ---- stop conditions and finishing -----------------------------------------------------
    def _stop_reason(self, seq: Sequence) -> str | None:
        p, t = seq.sampling_params, seq.last_token
        if (not p.ignore_eos and t == self.eos_token_id) or t in p.stop_token_ids:
            return "stop"
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.completion_token_ids, skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if hits:
                seq.text = text[:min(hits)]
                seq.stopped_by_string = True
                return "stop"
        if seq.num_completion_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        seq.finish_time = now
        self.scheduler.finish(seq, reason)
        self.metrics.observe_finished(seq)
        self._generators.pop(seq.seq_id, None)
        self.requests.pop(seq.request_id, None)
