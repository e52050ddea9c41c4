"""The scheduler: which sequences run in the next forward pass (continuous batching).

Every step it first keeps all RUNNING sequences decoding (one new token each), then admits WAITING
sequences, in the order the scheduling policy gives (first come, first served by default), while
the step has room: at most `max_num_seqs` sequences and `max_num_batched_tokens` new tokens, and
enough free KV blocks for the newcomer's whole prompt. Prefills and decodes of different
sequences share one packed forward pass, and a new request starts the step after a slot frees,
not when the whole batch is done (Yu et al., 2022, "Orca: A Distributed Serving System for
Transformer-Based Generative Models").

**Chunked prefill** (`enable_chunked_prefill=True`; Agrawal et al., 2024, "Taming
Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve"): a step computes at most
`max_num_batched_tokens` tokens, decodes first, then the next chunk of prompts already being
prefilled, then new admissions with whatever budget is left. A long prompt is split over several
steps, so it no longer stalls the running sequences' decodes for one long step, and the budget may
be smaller than the longest prompt. A sequence holds the blocks of its whole prompt from its
admission; its blocks enter the prefix cache only in the step that computes them, and its first
token is sampled after its last chunk.

When a running sequence needs a new block and none is free, the most recently admitted running
sequence is *preempted by recompute*: its blocks are freed and it goes back to the front of the
waiting queue, to be prefilled again (prompt + tokens generated so far) once blocks free up
(Kwon et al., 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention", section 4.5). The oldest request always makes progress, so the engine cannot
livelock as long as every request alone fits in the pool (the LLM checks that at admission).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from kvlab.engine.sequence import Sequence, SequenceStatus

SchedulingPolicy = Callable[[list[Sequence]], list[Sequence]]


def fcfs(waiting: list[Sequence]) -> list[Sequence]:
    """First come, first served: the queue as it is (preempted sequences were put in front)."""
    return waiting


class Scheduler:
    def __init__(self, block_manager, max_num_seqs: int, max_num_batched_tokens: int,
                 scheduling_policy: SchedulingPolicy | None = None, enable_chunked_prefill: bool = False):
        if max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({max_num_seqs}): every running sequence decodes each step")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = scheduling_policy or fcfs
        if enable_chunked_prefill and not hasattr(block_manager, "register_computed"):
            raise ValueError(f"enable_chunked_prefill needs a block manager with register_computed; "
                             f"{type(block_manager).__name__} has none")
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []          # in admission order, oldest first
        self.num_preemptions = 0
        self.prefix_cache_queries = 0              # prompt tokens looked up at admission
        self.prefix_cache_hits = 0                 # of which found in the prefix cache

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        """Pick this step's sequences; each computes `num_scheduled_tokens` tokens from
        `num_computed_tokens` on."""
        bm = self.block_manager
        # 1. decodes: every running sequence needs a slot for its newest token
        #    (chunked prefill: sequences still in their prompt continue in step 2)
        chunked = self.enable_chunked_prefill
        prefilling = [s for s in self.running if chunked and len(s) - s.num_computed_tokens > 1]
        queue = [s for s in self.running if s not in prefilling]
        decodes, preempted = [], False
        while queue:
            seq = queue.pop(0)
            while not bm.can_append(seq):
                preempted = True
                if prefilling:                     # the newest prompt still in progress first,
                    self.preempt(prefilling.pop())
                elif queue:
                    self.preempt(queue.pop())      # then the most recently admitted decode
                else:
                    self.preempt(seq)
                    seq = None
                    break
            if seq is not None:
                bm.may_append(seq)
                seq.num_scheduled_tokens = 1
                decodes.append(seq)
        # 2. chunked prefill: the next chunk of each prompt in progress, oldest first
        self.running = [s for s in self.running if s in decodes or s in prefilling]
        chunks, num_tokens = [], len(decodes)
        for seq in prefilling:
            n = min(len(seq) - seq.num_computed_tokens, self.max_num_batched_tokens - num_tokens)
            if n <= 0:
                break
            self._schedule_chunk(seq, n)
            chunks.append(seq)
            num_tokens += n
        # 3. admissions, unless blocks just ran out (the victims would only be evicted again)
        prefills = []
        if (not preempted or not decodes) and self.waiting:
            ordered = self.policy(list(self.waiting))
            if sorted(s.seq_id for s in ordered) != sorted(s.seq_id for s in self.waiting):
                raise ValueError("scheduling_policy must return a reordering of the waiting list")
            self.waiting = deque(ordered)
            while self.waiting and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                room = self.max_num_batched_tokens - num_tokens
                if (room <= 0 if chunked else len(seq) > room) or not bm.can_allocate(seq):
                    break                          # head-of-line: no overtaking (FCFS semantics)
                self.waiting.popleft()
                if chunked:           # its blocks are registered chunk by chunk (_schedule_chunk)
                    bm.allocate(seq, num_computed=0)
                else:
                    bm.allocate(seq)
                seq.num_computed_tokens = seq.num_cached_tokens
                seq.status = SequenceStatus.RUNNING
                self.prefix_cache_queries += len(seq)
                self.prefix_cache_hits += seq.num_cached_tokens
                n = min(len(seq) - seq.num_cached_tokens, room)
                if chunked:
                    self._schedule_chunk(seq, n)
                else:
                    seq.num_scheduled_tokens = n
                num_tokens += n
                self.running.append(seq)
                prefills.append(seq)
        return decodes + chunks + prefills

    def _schedule_chunk(self, seq: Sequence, n: int) -> None:
        """seq computes its next n prompt tokens this step; the blocks they fill become cached."""
        seq.num_scheduled_tokens = n
        self.block_manager.register_computed(seq, seq.num_computed_tokens + n)

    def preempt(self, seq: Sequence) -> None:
        """Recompute preemption: free seq's blocks and put it at the front of the waiting queue."""
        self.block_manager.deallocate(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if seq in self.running:
            self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished and give its blocks back."""
        if seq.status is SequenceStatus.RUNNING:
            self.block_manager.deallocate(seq)
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None
