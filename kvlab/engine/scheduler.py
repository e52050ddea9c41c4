"""The scheduler: which sequences run in the next forward pass (continuous batching).

Every step it first keeps all RUNNING sequences decoding (one new token each), then admits WAITING
sequences, in the order the scheduling policy gives (first come, first served by default), while
the step has room: at most `max_num_seqs` sequences and `max_num_batched_tokens` new tokens, and
enough free KV blocks for the newcomer's whole prompt. Prefills and decodes of different
sequences share one packed forward pass, and a new request starts the step after a slot frees,
not when the whole batch is done (Yu et al., 2022, "Orca: A Distributed Serving System for
Transformer-Based Generative Models").

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
                 scheduling_policy: SchedulingPolicy | None = None):
        if max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({max_num_seqs}): every running sequence decodes each step")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = scheduling_policy or fcfs
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
        """Pick this step's sequences; each computes its tokens from num_computed_tokens on."""
        bm = self.block_manager
        # 1. decodes: every running sequence needs a slot for its newest token
        queue, decodes, preempted = list(self.running), [], False
        while queue:
            seq = queue.pop(0)
            while not bm.can_append(seq):
                preempted = True
                if queue:
                    self.preempt(queue.pop())      # the most recently admitted one
                else:
                    self.preempt(seq)
                    seq = None
                    break
            if seq is not None:
                bm.may_append(seq)
                decodes.append(seq)
        self.running = list(decodes)
        # 2. admissions, unless blocks just ran out (the victims would only be evicted again)
        prefills, num_tokens = [], len(decodes)
        if (not preempted or not decodes) and self.waiting:
            ordered = self.policy(list(self.waiting))
            if sorted(s.seq_id for s in ordered) != sorted(s.seq_id for s in self.waiting):
                raise ValueError("scheduling_policy must return a reordering of the waiting list")
            self.waiting = deque(ordered)
            while self.waiting and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if num_tokens + len(seq) > self.max_num_batched_tokens or not bm.can_allocate(seq):
                    break                          # head-of-line: no overtaking (FCFS semantics)
                self.waiting.popleft()
                bm.allocate(seq)
                seq.num_computed_tokens = seq.num_cached_tokens
                seq.status = SequenceStatus.RUNNING
                self.prefix_cache_queries += len(seq)
                self.prefix_cache_hits += seq.num_cached_tokens
                num_tokens += len(seq) - seq.num_cached_tokens
                self.running.append(seq)
                prefills.append(seq)
        return decodes + prefills

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
