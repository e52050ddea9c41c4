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
be smaller than the longest prompt. A sequence gets the blocks of each chunk when that chunk is
scheduled (as vLLM allocates), its blocks enter the prefix cache only once the step that computes
them has run, and its first token is sampled after its last chunk.

**The step is explicit.** `schedule()` returns a `Schedule`: for each sequence, where its new
tokens start and how many there are (`ScheduledChunk`), plus the blocks whose contents the block
manager dropped since the last schedule (`freed_blocks`, for a cache that keeps state per block).
Planning a step *is* advancing it: `schedule()` moves each sequence's `num_computed_tokens` to the
end of its chunk and tells the block manager which tokens the step computes
(`register_computed`): their full blocks become findable at once, so a sequence admitted in the
same step shares them (every layer writes the step's new K/V before its attention reads any). If
the forward raises, the engine calls `rollback(schedule)`: the step's blocks are unregistered
(`register_computed(seq, start)`), its sequences go back to the front of the waiting queue, and
nothing the failed step should have written is findable.
Admission counts the tokens a newcomer will *compute*: its prefix-cache hits cost no budget.

When a running sequence needs a new block and none is free, the most recently admitted running
sequence is *preempted by recompute*: its blocks are freed and it goes back to the front of the
waiting queue, to be prefilled again (prompt + tokens generated so far) once blocks free up
(Kwon et al., 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention", section 4.5). The oldest request always makes progress, so the engine cannot
livelock as long as every request alone fits in the pool (the LLM checks that at admission).

**A per-sequence KV budget** (`evictor`, kvlab/engine/kv_eviction.py): before anything else a step
asks the evictor which running sequences are cut now; their new block tables come from the block
manager at once (the blocks they let go serve this step), and the copies the cache must make
before the forward travel in `Schedule.compactions`. Block counts are then in cache entries
(`num_evicted_tokens` fewer than tokens); the block manager does that conversion.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvlab.engine.kv_eviction import Evictor
from kvlab.engine.row_budget import RowBudget
from kvlab.engine.sequence import Sequence, SequenceStatus

SchedulingPolicy = Callable[[list[Sequence]], list[Sequence]]


def fcfs(waiting: list[Sequence]) -> list[Sequence]:
    """First come, first served: the queue as it is (preempted sequences were put in front)."""
    return waiting


def shortest_prompt_first(waiting: list[Sequence]) -> list[Sequence]:
    """Shorter sequences first (ties: arrival order); preempted sequences keep their place in front."""
    front = [s for s in waiting if s.num_preemptions]
    rest = sorted((s for s in waiting if not s.num_preemptions), key=len)
    return front + rest


POLICIES: dict[str, SchedulingPolicy] = {"fcfs": fcfs, "shortest_prompt_first": shortest_prompt_first}


def resolve_policy(policy) -> SchedulingPolicy:
    """None or a name of POLICIES -> that policy; a callable is returned as it is."""
    if policy is None:
        return fcfs
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"scheduling_policy must be one of {sorted(POLICIES)} or a callable, "
                             f"got {policy!r}")
        return POLICIES[policy]
    if not callable(policy):
        raise ValueError(f"scheduling_policy must be a name or a callable, got {type(policy).__name__}")
    return policy


@dataclass
class ScheduledChunk:
    """One sequence in one step: it computes the K/V of positions [start, start + num_tokens)."""
    seq: Sequence
    start: int
    num_tokens: int
    score_from: int | None = None     # KV budget: queries from this position on are scored

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """Does this step produce the sequence's next token (not a chunk ending inside the prompt)?"""
        return self.end == len(self.seq)


@dataclass
class Schedule:
    """What one step computes: decodes first, then prompt chunks in progress, then admissions."""
    items: list[ScheduledChunk] = field(default_factory=list)
    freed_blocks: list[int] = field(default_factory=list)   # contents dropped since the last schedule
    num_preempted: int = 0                                   # sequences preempted while planning it
    compactions: list = field(default_factory=list)          # KV budget cuts the cache copies first

    @property
    def seqs(self) -> list[Sequence]:
        return [item.seq for item in self.items]

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        """The step's sequences, in order (as `seqs`)."""
        return iter(self.seqs)


class Scheduler:
    """Scheduler(block_manager, max_num_seqs, max_num_batched_tokens, scheduling_policy=None,
    enable_chunked_prefill=False, rows=None). It alone owns `block_manager` (kvlab/engine/protocols.py,
    `BlockAllocator`: kvlab's BlockManager, RadixCache, or a student's object). `rows`: the
    cache's row pools (kvlab/engine/row_budget.py, `RowBudget`), counted at admission as blocks are."""

    def __init__(self, block_manager, max_num_seqs: int, max_num_batched_tokens: int,
                 scheduling_policy: SchedulingPolicy | str | None = None,
                 enable_chunked_prefill: bool = False, rows: RowBudget | None = None,
                 evictor: Evictor | None = None):
        if max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({max_num_seqs}): every running sequence decodes each step")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = resolve_policy(scheduling_policy)
        if enable_chunked_prefill and not getattr(block_manager, "supports_chunked_prefill", True):
            raise ValueError(f"enable_chunked_prefill needs a block manager that registers blocks "
                             f"chunk by chunk; {type(block_manager).__name__} does not")
        self.enable_chunked_prefill = enable_chunked_prefill
        self.rows = rows or RowBudget(getattr(block_manager, "block_size", 1))
        self.evictor = evictor                     # a per-sequence KV budget, or None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []          # in admission order, oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning a step -------------------------------------------------------------------
    def schedule(self) -> Schedule:
        """Plan the next step and advance each planned sequence's `num_computed_tokens` to it."""
        bm, chunked = self.block_manager, self.enable_chunked_prefill
        preempted_before = self.num_preemptions
        # 0. a KV budget: sequences over it are cut first (their blocks free up for this step)
        cuts = []
        if self.evictor is not None:
            planned = ((s, self.evictor.plan(s, bm)) for s in list(self.running))
            cuts = [(s, c) for s, c in planned if c is not None]
        # 1. decodes: every running sequence whose tokens are all computed but the newest
        #    (chunked prefill: sequences still in their prompt continue in step 2)
        prefilling = [s for s in self.running if len(s) - s.num_computed_tokens > 1]
        queue = [s for s in self.running if s not in prefilling]
        decodes = []
        while queue:
            seq = queue.pop(0)
            while not bm.can_append(seq, len(seq)):
                if prefilling:                     # the newest prompt still in progress first,
                    self.preempt(prefilling.pop())
                elif queue:
                    self.preempt(queue.pop())      # then the most recently admitted decode
                else:
                    self.preempt(seq)
                    seq = None
                    break
            if seq is not None:
                bm.may_append(seq, len(seq))
                bm.register_computed(seq, len(seq))
                decodes.append(seq)
        preempted = self.num_preemptions > preempted_before
        items = [ScheduledChunk(s, s.num_computed_tokens, 1) for s in decodes]
        num_tokens = len(decodes)
        # 2. chunked prefill: the next chunk of each prompt in progress, oldest first
        self.running = [s for s in self.running if s in decodes or s in prefilling]
        rows = self.rows
        rows_used = sum(rows.rows_for(it.start, it.end) for it in items) + sum(map(rows.held, prefilling))
        while prefilling and num_tokens < self.max_num_batched_tokens:
            seq = prefilling.pop(0)
            start = seq.num_computed_tokens
            want = min(len(seq) - start, self.max_num_batched_tokens - num_tokens)
            fit_rows = rows.fit(start, want, rows_used)
            if fit_rows <= 0:                      # its rows do not fit this step: it waits
                continue
            n = self._fit(seq, start, fit_rows)
            if n <= 0:                             # no block for even one token: free the newest
                self.preempt(prefilling.pop() if prefilling else seq)
                preempted = True
                if seq.status is SequenceStatus.RUNNING:
                    prefilling.insert(0, seq)
                continue
            rows_used += rows.rows_for(start, start + n) - rows.held(seq)
            bm.may_append(seq, start + n)
            bm.register_computed(seq, start + n)
            items.append(ScheduledChunk(seq, start, n))
            num_tokens += n
        # 3. admissions, unless blocks just ran out (the victims would only be evicted again)
        if (not preempted or not decodes) and self.waiting:
            ordered = list(self.policy(list(self.waiting)))
            if sorted(s.seq_id for s in ordered) != sorted(s.seq_id for s in self.waiting):
                raise ValueError("scheduling_policy must return a reordering of the waiting list")
            self.waiting = deque(ordered)
            while self.waiting and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                room = self.max_num_batched_tokens - num_tokens
                cached = bm.lookup(seq)            # prefix-cache hits cost no token budget
                n = len(seq) - cached
                if chunked:
                    n = rows.fit(cached, min(n, room), rows_used)
                if (n <= 0 or n > room or rows_used + rows.rows_for(cached, cached + n) > rows.residual_rows > 0
                        or not rows.sinks_fit(self.running, bm, cached) or not bm.can_allocate(seq, cached + n)):
                    break                          # head-of-line: no overtaking (FCFS semantics)
                self.waiting.popleft()
                bm.allocate(seq, cached + n)
                assert seq.num_cached_tokens == cached, "lookup and allocate disagree"
                bm.register_computed(seq, cached + n)
                seq.status = SequenceStatus.RUNNING
                items.append(ScheduledChunk(seq, cached, n))
                num_tokens += n
                rows_used += rows.rows_for(cached, cached + n)
                self.running.append(seq)
        for item in items:                         # planning the step is advancing it
            item.seq.num_computed_tokens = item.end
        if self.evictor is not None:
            for item in items:
                item.score_from = self.evictor.score_from(item.seq)
        copies = [c for seq, c in cuts if seq.status is SequenceStatus.RUNNING]   # not preempted since
        return Schedule(items, bm.take_events(), self.num_preemptions - preempted_before, copies)

    def _fit(self, seq: Sequence, start: int, n: int) -> int:
        """The largest chunk <= n from `start` whose blocks seq holds or can get now."""
        bs = self.block_manager.block_size
        while n > 0 and not self.block_manager.can_append(seq, start + n):
            n = ((start + n - 1) // bs) * bs - start           # one block fewer
        return max(n, 0)

    # ---- a failed step ---------------------------------------------------------------------
    def rollback(self, schedule: Schedule) -> None:
        """The step's forward raised: what it registered is unregistered, and its sequences lose
        their blocks and go back to the front of the waiting queue, to be recomputed."""
        running = [it for it in schedule.items if it.seq.status is SequenceStatus.RUNNING]
        for item in running:
            self.block_manager.register_computed(item.seq, item.start)
        for item in reversed(running):
            self._requeue(item.seq)

    # ---- preemption and finishing ----------------------------------------------------------
    def _requeue(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.num_evicted_tokens = seq.num_pinned_entries = 0     # recomputed from its tokens
        seq.kv_snapped = False
        seq.status = SequenceStatus.WAITING
        if seq in self.running:
            self.running.remove(seq)
        self.waiting.appendleft(seq)

    def preempt(self, seq: Sequence) -> None:
        """Recompute preemption: free seq's blocks and put it at the front of the waiting queue."""
        self._requeue(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished and give its blocks back."""
        if seq.status is SequenceStatus.RUNNING:
            self.block_manager.deallocate(seq)
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def take_events(self) -> list[int]:
        """Blocks whose contents were dropped since the last schedule (see `Schedule.freed_blocks`)."""
        return self.block_manager.take_events()

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None
