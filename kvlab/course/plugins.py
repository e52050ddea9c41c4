"""Run a student's implementation of one engine part inside `kvlab.LLM`, on SmolLM2 (chapters 06-11).

Each exercise of chapters 06-11 has the student write one mechanism with the signature of the
kvlab piece it mirrors; its graded tests then plug that piece into the real engine and compare the
greedy tokens (or the prefix-cache hits, or the schedule) with the unmodified engine's. The
adapters here do the plugging, and nothing else: they hold no logic a student is asked to write.

    ref = greedy_tokens(make_llm(), PROMPTS, 8)
    llm = make_llm(kv_cache=plugged_cache(student_paged_attend))
    assert greedy_tokens(llm, PROMPTS, 8) == ref

Where the engine has a constructor seam for the part (kvlab/engine/protocols.py), the adapter is
that argument's object or factory and the student's part enters at construction:
`make_llm(scheduler=step_scheduler(schedule_step))` (chapter 07), `make_llm(engine_core=
step_loop(engine_step))` (chapter 11), `make_llm(attention_backend=BackendParts(...))` (chapter
10), `make_llm(prefix_cache=plugged_block_manager(...))` (chapter 08) and
`make_llm(prefix_cache=allocator_block_manager(...))` (chapter 06, exercise 1),
`make_llm(kv_cache=plugged_cache(...))` (chapter 06, exercise 4: a cache whose `attend` writes and
attends in one call) and `make_llm(kv_cache=plugged_int8_cache(...))`
(chapter 09, exercise 3). Every in-engine exercise enters at construction now.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from kvlab.cache.paged import PagedKVCache, step_metadata
from kvlab.engine.core import EngineCore, StepOutput
from kvlab.engine.scheduler import Schedule, ScheduledChunk, Scheduler
from kvlab.engine.sequence import SequenceStatus

#: Short prompts of different lengths (token ids are taken from the tokenizer at run time).
PROMPTS = ("The capital of France is",
           "A paged KV cache stores keys and values in",
           "1, 2, 3, 4, 5,")


@functools.cache
def course_model():
    """(model, tokenizer) of SmolLM2-135M in float32, loaded once per process."""
    from kvlab.model.load import load_model

    model, tok = load_model()
    model.eval()
    return model, tok


def make_llm(**kwargs):
    """A fresh `kvlab.LLM` on the shared course model (a small pool unless told otherwise)."""
    from kvlab.engine.llm import LLM

    kwargs.setdefault("max_model_len", 256)
    kwargs.setdefault("max_num_seqs", 8)
    sized = ("num_kv_blocks" in kwargs or "kv_cache_memory_bytes" in kwargs
             or not isinstance(kwargs.get("prefix_cache") or "", str))   # a block allocator object is
    if not sized:
        kwargs["num_kv_blocks"] = 64
    return LLM(model=course_model(), **kwargs)


def prompt_ids(prompts=PROMPTS) -> list[list[int]]:
    _, tok = course_model()
    return [list(tok.encode(p)) for p in prompts]


def greedy_tokens(llm, prompts=PROMPTS, max_tokens: int = 8) -> list[list[int]]:
    """Greedy completions (token ids) of `prompts` (texts or token-id lists) on `llm`, all at once."""
    from kvlab.engine.sampling import SamplingParams

    ids = [p if isinstance(p, list) else prompt_ids([p])[0] for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(ids, params, use_tqdm=False)]


# ---- the KV cache / attention seam -----------------------------------------------------------
class PluggedPagedCache(PagedKVCache):
    """A paged cache whose per-layer work is a student's function.

    `attend(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, context_lens, block_tables,
    scale) -> out` receives the step's packed tensors of one layer (q [N, Hq, D], k and v
    [N, Hkv, D], the layer's pools [NB, BS, Hkv, D] and the step's AttentionMetadata fields): it
    writes the new K/V into the pools and returns attention [N, Hq, D], as
    `PagedKVCache.attend` does through `kvlab.attention.paged_torch`.
    """

    def __init__(self, *args, attend=None, **kwargs):
        super().__init__(*args, **kwargs)
        if attend is None:
            raise ValueError("PluggedPagedCache needs attend=<function>")
        self.attend_fn = attend

    def attend(self, layer, q, k, v):
        m = step_metadata(self, q)
        out = self.attend_fn(q[0], k[0], v[0], self.k_cache[layer], self.v_cache[layer],
                             m.slot_mapping, m.query_start_loc, m.context_lens, m.block_tables,
                             self.scale)
        if out is None or tuple(out.shape) != tuple(q[0].shape):
            raise ValueError(f"the plugged attend returned {None if out is None else tuple(out.shape)}, "
                             f"expected {tuple(q[0].shape)}")
        return out.unsqueeze(0)


def plugged_cache(attend):
    """`kvlab.LLM(kv_cache=plugged_cache(attend))`: the KV-cache seam builds a PluggedPagedCache of
    the engine's planned shape with the student's `attend`."""
    return functools.partial(PluggedPagedCache, attend=attend)


def split_packed(x: torch.Tensor, query_start_loc: torch.Tensor) -> list[torch.Tensor]:
    """Rows of a packed tensor per sequence (a convenience for plugged functions)."""
    qsl = query_start_loc.tolist()
    return [x[qsl[s]:qsl[s + 1]] for s in range(len(qsl) - 1)]


# ---- the attention backend seam (a constructor argument: no installer) --------------------------
class BackendParts:
    """An attention backend object (`kvlab.engine.protocols.AttentionBackend`) made of the functions
    given, with kvlab's PyTorch reference (`kvlab.attention.paged_torch`) for the others. It goes
    through the engine's own seam, `make_llm(attention_backend=BackendParts(reshape_and_cache=f))`:
    every layer of every step then writes its new K/V with `f` and reads them with kvlab's attention.
    """

    def __init__(self, reshape_and_cache=None, paged_decode_attention=None, paged_prefill_attention=None):
        from kvlab.attention import paged_torch

        self.reshape_and_cache = reshape_and_cache or paged_torch.reshape_and_cache
        self.paged_decode_attention = paged_decode_attention or paged_torch.paged_decode_attention
        self.paged_prefill_attention = paged_prefill_attention or paged_torch.paged_prefill_attention


# ---- the block allocator seam ----------------------------------------------------------------
class AllocatorFreeQueue:
    """The block manager's free queue, backed by a student's allocator.

    The allocator has `allocate() -> block_id`, `release(block_id)` and `num_free`, and starts with
    every block free. Without prefix caching the block manager only takes blocks from the head and
    gives them back, so those three calls are all it needs.
    """

    def __init__(self, allocator, num_blocks: int):
        if allocator.num_free != num_blocks:
            raise ValueError(f"the allocator has {allocator.num_free} free blocks, the pool {num_blocks}")
        self.allocator = allocator

    def __len__(self) -> int:
        return self.allocator.num_free

    def popleft(self) -> int:
        return self.allocator.allocate()

    def append(self, block_id: int) -> None:
        self.allocator.release(block_id)

    appendleft = append

    def remove(self, block_id: int) -> None:
        raise RuntimeError("a plain allocator cannot hand out a particular block (prefix caching is off)")


def allocator_block_manager(allocator, num_blocks: int, block_size: int):
    """A `BlockManager` without prefix caching that takes and returns its blocks through a
    student's `allocator`: the object for `make_llm(prefix_cache=...)` (the block allocator seam)."""
    from kvlab.engine.block_manager import BlockManager

    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    bm.free_queue = AllocatorFreeQueue(allocator, num_blocks)
    return bm


# ---- the scheduler seam (a constructor argument: LLM(scheduler=...)) ---------------------------
class StepScheduler(Scheduler):
    """The engine's scheduler with its step decided by a student's `schedule_step`.

    `schedule_step(running, waiting, block_manager, max_num_seqs, max_num_batched_tokens)
    -> (decodes, prefills, preempted)` mirrors `kvlab.engine.scheduler.Scheduler.schedule` without
    chunked prefill: it reorders nothing, calls the block manager (`can_append` / `may_append`,
    `can_allocate` / `allocate`, `deallocate`) and moves sequences between `running` (a list,
    oldest admission first) and `waiting` (a deque, head first) in place. This adapter turns the
    three lists into the engine's `Schedule` and keeps the per-sequence counters the engine reads
    (what the kvlab scheduler sets itself). Options it does not do (chunked prefill, a policy,
    the row pools of a quantized cache) are refused, not ignored.
    """

    def __init__(self, block_manager, max_num_seqs, max_num_batched_tokens, schedule_step,
                 scheduling_policy=None, enable_chunked_prefill=False, rows=None):
        if enable_chunked_prefill or scheduling_policy not in (None, "fcfs"):
            raise ValueError("scheduler: a schedule_step admits whole prompts in arrival order "
                             "(no enable_chunked_prefill, no scheduling_policy)")
        if rows is not None and (rows.residual_rows or rows.sink_rows):
            raise ValueError("scheduler: a schedule_step does not count a cache's row pools "
                             "(kv_cache_dtype 'auto', 'int8' or 'fp8', no keep_sink_token)")
        super().__init__(block_manager, max_num_seqs, max_num_batched_tokens)
        self.schedule_step = schedule_step

    def schedule(self) -> Schedule:
        before = {s.seq_id for s in self.running}
        result = self.schedule_step(self.running, self.waiting, self.block_manager, self.max_num_seqs,
                                    self.max_num_batched_tokens)
        if not isinstance(result, tuple) or len(result) != 3:
            raise ValueError(f"schedule_step must return (decodes, prefills, preempted), got {result!r}")
        decodes, prefills, preempted = (list(x) for x in result)
        for seq in preempted:
            seq.num_computed_tokens = seq.num_cached_tokens = 0
            seq.status = SequenceStatus.WAITING
            seq.num_preemptions += 1
            self.num_preemptions += 1
        items = []
        for seq in decodes:
            if seq.seq_id not in before:
                raise ValueError(f"sequence {seq.seq_id} was decoded but was not running")
            items.append(ScheduledChunk(seq, len(seq) - 1, 1))
        for seq in prefills:
            seq.status = SequenceStatus.RUNNING
            items.append(ScheduledChunk(seq, seq.num_cached_tokens, len(seq) - seq.num_cached_tokens))
        for item in items:                     # the step's plan; planning it is advancing it
            self.block_manager.register_computed(item.seq, item.end)
            item.seq.num_computed_tokens = item.end
        return Schedule(items, self.block_manager.take_events(), len(preempted))


def step_scheduler(schedule_step):
    """The factory for `make_llm(scheduler=...)`: the engine's scheduler seam builds a
    `StepScheduler` around its block allocator, with `schedule_step` deciding every step."""
    return functools.partial(StepScheduler, schedule_step=schedule_step)


# ---- the prefix-cache seam -------------------------------------------------------------------
class QueueAdapter:
    """The block manager's free queue, backed by a student's LRU queue with `pop_head()`,
    `push_tail(b)`, `push_head(b)`, `remove(b)`, `order()` and `len()`."""

    def __init__(self, queue):
        self.queue = queue

    def __len__(self) -> int:
        return len(self.queue)

    def __iter__(self):
        return iter(self.queue.order())

    def __contains__(self, block_id) -> bool:
        return block_id in self.queue.order()

    def popleft(self) -> int:
        return self.queue.pop_head()

    def append(self, block_id: int) -> None:
        self.queue.push_tail(block_id)

    def appendleft(self, block_id: int) -> None:
        self.queue.push_head(block_id)

    def remove(self, block_id: int) -> None:
        self.queue.remove(block_id)


def plugged_block_manager(num_blocks: int, block_size: int, chain_hashes=None, cached_prefix=None,
                          free_queue=None):
    """A prefix-caching `BlockManager` whose block names, prefix lookup and free queue are a
    student's, the object for `make_llm(prefix_cache=...)` (the block allocator seam):
    `chain_hashes(token_ids, block_size, salt)` names the full blocks, `cached_prefix(block_manager,
    seq) -> [Block]` finds a sequence's cached blocks (as `BlockManager._cached_prefix`),
    `free_queue(block_ids)` builds the LRU queue. Any left None stays the engine's."""
    from kvlab.engine.block_manager import BlockManager
    from kvlab.engine.prefix_hash import extra_keys_for

    class PluggedBlockManager(BlockManager):
        if chain_hashes is not None:
            def _block_key(self, seq, i, parent_hash):
                bs = self.block_size
                tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                h = chain_hashes(list(seq.token_ids[:(i + 1) * bs]), bs, seq.cache_salt)[i]
                return h, tokens, extra_keys_for(seq.cache_salt) if i == 0 else ()

        if cached_prefix is not None:
            def _cached_prefix(self, seq):
                if not self.enable_prefix_caching:
                    return []
                return list(cached_prefix(self, seq))

    bm = PluggedBlockManager(num_blocks, block_size, enable_prefix_caching=True)
    if free_queue is not None:
        bm.free_queue = QueueAdapter(free_queue(range(num_blocks)))
    return bm


def cached_tokens_per_request(llm, prompts, max_tokens: int = 2) -> list[int]:
    """Run prompts one after another (greedy); each request's prefix-cache hits in tokens. A prompt
    is a token-id list or a (token ids, cache_salt) pair."""
    from kvlab.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    hits = []
    for p in prompts:
        ids, salt = p if isinstance(p, tuple) else (p, None)
        llm.add_request(list(ids), params, cache_salt=salt)
        outs = []
        while llm.has_unfinished_requests():
            outs += llm.step()
        hits.append(outs[-1].num_cached_tokens)
    return hits


class PluggedInt8Cache(PagedKVCache):
    """An int8 paged cache (codes int8 [NB, BS, Hkv, D] and float32 scales [NB, BS, Hkv] per layer,
    for K and for V) whose per-layer work is a student's function:

    `attend(q, k, v, k_codes, k_scales, v_codes, v_scales, slot_mapping, query_start_loc,
    context_lens, block_tables, scale) -> out [N, Hq, D]` quantizes the new K/V into the pools and
    returns attention over the dequantized context."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.float32,
                 device="cpu", attention_backend="torch", attend=None):
        super().__init__(1, 1, 1, 1, 1, dtype=dtype, device=device)     # the float pools are not used
        if attend is None:
            raise ValueError("PluggedInt8Cache needs attend=<function>")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.attend_fn = attend
        codes = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_codes = [torch.zeros(codes, dtype=torch.int8, device=self.device) for _ in range(num_layers)]
        self.v_codes = [torch.zeros(codes, dtype=torch.int8, device=self.device) for _ in range(num_layers)]
        self.k_scales = [torch.ones(codes[:3], device=self.device) for _ in range(num_layers)]
        self.v_scales = [torch.ones(codes[:3], device=self.device) for _ in range(num_layers)]
        self.k_cache = self.v_cache = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (*self.k_codes, *self.v_codes, *self.k_scales, *self.v_scales))

    def attend(self, layer, q, k, v):
        m = step_metadata(self, q)
        out = self.attend_fn(q[0], k[0], v[0], self.k_codes[layer], self.k_scales[layer],
                             self.v_codes[layer], self.v_scales[layer], m.slot_mapping,
                             m.query_start_loc, m.context_lens, m.block_tables, self.scale)
        if out is None or tuple(out.shape) != tuple(q[0].shape):
            raise ValueError(f"the plugged attend returned {None if out is None else tuple(out.shape)}, "
                             f"expected {tuple(q[0].shape)}")
        return out.to(q.dtype).unsqueeze(0)


def plugged_int8_cache(attend):
    """`kvlab.LLM(kv_cache=plugged_int8_cache(attend))`: the KV-cache seam builds a PluggedInt8Cache
    of the engine's planned shape (its blocks, in int8 with float32 scales: smaller than the
    full-precision pools the plan sized) with the student's `attend`."""
    return functools.partial(PluggedInt8Cache, attend=attend)


# ---- the engine step ---------------------------------------------------------------------------
@dataclass
class Chunk:
    """One scheduled sequence of a step: it computes the K/V of positions [start, start + num_tokens)."""
    seq: object
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


def to_metadata(prepared: dict, device="cpu"):
    """A student's `prepare_step` result (plain lists) -> (input_ids [1, N], positions [1, N],
    AttentionMetadata, logit_indices [S]) as `ModelRunner.prepare` returns them."""
    from kvlab.cache.paged import AttentionMetadata

    keys = ("input_ids", "positions", "slot_mapping", "query_start_loc", "context_lens", "block_tables",
            "logit_indices")
    if not isinstance(prepared, dict) or set(prepared) != set(keys):
        raise ValueError(f"prepare_step must return a dict with the keys {keys}")
    t = {k: torch.as_tensor(prepared[k], device=device) for k in keys}
    qsl = t["query_start_loc"].to(torch.int32)
    meta = AttentionMetadata(slot_mapping=t["slot_mapping"].long(), query_start_loc=qsl,
                             context_lens=t["context_lens"].to(torch.int32),
                             block_tables=t["block_tables"].to(torch.int32).reshape(len(qsl) - 1, -1),
                             is_decode=int(qsl[-1]) == len(qsl) - 1)
    return (t["input_ids"].long().view(1, -1), t["positions"].long().view(1, -1), meta,
            t["logit_indices"].long())


class EngineParts:
    """What one engine step needs from the engine core, for a student's `engine_step(parts)`:

    - `parts.schedule()` -> the step's `Chunk`s (`seq`, `start`, `num_tokens`, `end`): which
      sequences compute which positions (the scheduler has recorded that progress already);
    - `parts.block_size`;
    - `parts.forward(prepared)` runs the model over the paged cache on a `prepare_step` result and
      returns the logits of its `logit_indices` rows, [S, vocab];
    - `parts.sample(logits, seqs)` -> one token id per row (each sequence's SamplingParams);
    - `parts.stop_reason(seq)` -> "stop", "length" or None, after a token was appended;
    - `parts.finish(seq, reason)` frees the sequence's blocks and records it as finished.
    """

    def __init__(self, core):
        self.core = core
        self.block_size = core.runner.block_size
        self._schedule = Schedule()

    def schedule(self) -> list[Chunk]:
        core = self.core
        self._schedule = planned = core.scheduler.schedule()
        if not planned.items:
            core.runner.release(planned.freed_blocks)
            if core.scheduler.waiting:
                raise RuntimeError("no request could be scheduled although the engine is idle")
        return [Chunk(it.seq, it.start, it.num_tokens) for it in planned.items]

    def forward(self, prepared):
        """The model over the paged cache; if it raises, the scheduler rolls the step back."""
        runner, planned = self.core.runner, self._schedule
        ids, pos, meta, logit_indices = to_metadata(prepared, runner.device)
        runner.cache.begin_step(meta, planned.freed_blocks)
        try:
            with torch.inference_mode():
                return runner.model(ids, positions=pos, cache=runner.cache, logit_indices=logit_indices)
        except BaseException:
            self.core.scheduler.rollback(planned)
            raise
        finally:
            runner.cache.end_step()

    def sample(self, logits, seqs):
        from kvlab.engine.sampling import sample

        gens = self.core._generators
        return sample(logits, [s.sampling_params for s in seqs], [gens.get(s.seq_id) for s in seqs])

    def stop_reason(self, seq):
        return self.core._stop_reason(seq)

    def finish(self, seq, reason):
        now = time.perf_counter()
        if seq.first_token_time is None and seq.num_completion_tokens:
            seq.first_token_time = now
        self.core._finish(seq, reason, now)


class StepLoopCore(EngineCore):
    """kvlab's engine core (requests, aborts, seeds, stop conditions, metrics) whose `step()` is a
    student's `engine_step(parts) -> [(seq, token_id), ...]` (`parts`: an `EngineParts`). This
    adapter only reports the aborted requests, stamps first-token times, counts the generated
    tokens and hands the blocks the step dropped to the cache, as `EngineCore.step` does around
    its loop."""

    def __init__(self, scheduler, runner, max_model_len, eos_token_id, tokenizer=None, device="cpu", *,
                 engine_step):
        super().__init__(scheduler, runner, max_model_len, eos_token_id, tokenizer, device)
        self.engine_step = engine_step

    def step(self) -> list[StepOutput]:
        outputs = [StepOutput(seq, []) for seq in self._aborted]
        self._aborted = []
        produced = list(self.engine_step(EngineParts(self)))
        now = time.perf_counter()
        for seq, token in produced:
            if seq.first_token_time is None:
                seq.first_token_time = now
            outputs.append(StepOutput(seq, [token]))
        self.metrics.generation_tokens += len(produced)
        self.runner.release(self.scheduler.take_events())
        return outputs


def step_loop(engine_step):
    """The factory for `make_llm(engine_core=...)`: the engine's step-loop seam builds a
    `StepLoopCore` around its scheduler and model runner, with `engine_step` running every step."""
    return functools.partial(StepLoopCore, engine_step=engine_step)
