"""Run a student's implementation of one engine part inside `kvlab.LLM`, on SmolLM2 (chapters 06-11).

Each exercise of chapters 06-11 has the student write one mechanism with the signature of the
kvlab piece it mirrors; its graded tests then plug that piece into the real engine and compare the
greedy tokens (or the prefix-cache hits, or the schedule) with the unmodified engine's. The
adapters here do the plugging, and nothing else: they hold no logic a student is asked to write.

    ref = greedy_tokens(make_llm(), PROMPTS, 8)
    llm = make_llm()
    install_cache(llm, PluggedPagedCache.like(llm.cache, attend=student_paged_attend))
    assert greedy_tokens(llm, PROMPTS, 8) == ref

They install a part into an `LLM` instance after construction (`install_cache`,
`install_scheduler`, `install_block_manager`). When the engine exposes a constructor argument for
the same part (issue 13's seams), the adapter becomes that argument's object and these installers
go away; the exercises' signatures do not change. `BackendParts` is the first of those: an
attention backend object for `make_llm(attention_backend=...)` (chapter 10, exercise 5).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvlab.cache.paged import PagedKVCache, step_metadata

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
    if "num_kv_blocks" not in kwargs and "kv_cache_memory_bytes" not in kwargs:
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

    @classmethod
    def like(cls, cache: PagedKVCache, attend) -> PluggedPagedCache:
        """A fresh cache of the same shape as `cache` (an LLM's), with `attend` plugged in."""
        return cls(cache.num_layers, cache.num_blocks, cache.block_size, cache.num_kv_heads,
                   cache.head_dim, dtype=cache.dtype, device=cache.device, attend=attend)

    def attend(self, layer, q, k, v):
        m = step_metadata(self, q)
        out = self.attend_fn(q[0], k[0], v[0], self.k_cache[layer], self.v_cache[layer],
                             m.slot_mapping, m.query_start_loc, m.context_lens, m.block_tables,
                             self.scale)
        if out is None or tuple(out.shape) != tuple(q[0].shape):
            raise ValueError(f"the plugged attend returned {None if out is None else tuple(out.shape)}, "
                             f"expected {tuple(q[0].shape)}")
        return out.unsqueeze(0)


def install_cache(llm, cache) -> None:
    """Make `cache` the KV cache `llm`'s model runner uses (an empty engine only)."""
    if llm.has_unfinished_requests():
        raise ValueError("install_cache needs an idle engine")
    llm.cache = cache
    llm.runner.cache = cache


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


def install_allocator(llm, allocator) -> None:
    """Let `llm`'s block manager take and return blocks through `allocator` (prefix caching off)."""
    bm = llm.block_manager
    if bm.enable_prefix_caching:
        raise ValueError("install_allocator needs LLM(enable_prefix_caching=False)")
    bm.free_queue = AllocatorFreeQueue(allocator, bm.num_blocks)


# ---- the scheduler seam ----------------------------------------------------------------------
def install_scheduler(llm, scheduler) -> None:
    """Make `scheduler` (an object with the engine scheduler's interface) drive `llm`."""
    if llm.has_unfinished_requests():
        raise ValueError("install_scheduler needs an idle engine")
    if hasattr(llm, "engine"):                 # the engine core owns the scheduler
        llm.engine.scheduler = scheduler
    else:
        llm.scheduler = scheduler


def install_block_manager(llm, block_manager) -> None:
    """Make `block_manager` the one `llm` and its scheduler use (an idle engine only)."""
    if llm.has_unfinished_requests():
        raise ValueError("install_block_manager needs an idle engine")
    if not hasattr(llm, "engine"):
        llm.block_manager = block_manager
    llm.scheduler.block_manager = block_manager


def split_packed(x: torch.Tensor, query_start_loc: torch.Tensor) -> list[torch.Tensor]:
    """Rows of a packed tensor per sequence (a convenience for plugged functions)."""
    qsl = query_start_loc.tolist()
    return [x[qsl[s]:qsl[s + 1]] for s in range(len(qsl) - 1)]


class StepScheduler:
    """The engine's scheduler with its step decided by a student's `schedule_step`.

    `schedule_step(running, waiting, block_manager, max_num_seqs, max_num_batched_tokens)
    -> (decodes, prefills, preempted)` mirrors `kvlab.engine.scheduler.Scheduler.schedule` without
    chunked prefill: it reorders nothing, calls the block manager (`can_append` / `may_append`,
    `can_allocate` / `allocate`, `deallocate`) and moves sequences between `running` (a list,
    oldest admission first) and `waiting` (a deque, head first) in place. This adapter keeps the
    per-sequence counters the engine reads (what the kvlab scheduler sets itself).
    """

    def __new__(cls, block_manager, max_num_seqs, max_num_batched_tokens, schedule_step):
        from kvlab.engine.scheduler import Scheduler

        class _Plugged(Scheduler):
            def schedule(self):
                return _plugged_schedule(self, schedule_step)

        return _Plugged(block_manager, max_num_seqs, max_num_batched_tokens)

    @staticmethod
    def like(llm, schedule_step):
        s = llm.scheduler
        return StepScheduler(s.block_manager, s.max_num_seqs, s.max_num_batched_tokens, schedule_step)


def _plugged_schedule(self, schedule_step):
    from kvlab.engine.sequence import SequenceStatus

    before = {s.seq_id for s in self.running}
    result = schedule_step(self.running, self.waiting, self.block_manager, self.max_num_seqs,
                           self.max_num_batched_tokens)
    if not isinstance(result, tuple) or len(result) != 3:
        raise ValueError(f"schedule_step must return (decodes, prefills, preempted), got {result!r}")
    decodes, prefills, preempted = (list(x) for x in result)
    for seq in preempted:
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
    for seq in decodes:
        if seq.seq_id not in before:
            raise ValueError(f"sequence {seq.seq_id} was decoded but was not running")
        seq.num_scheduled_tokens = 1
    for seq in prefills:
        seq.num_computed_tokens = seq.num_cached_tokens
        seq.num_scheduled_tokens = len(seq) - seq.num_cached_tokens
        seq.status = SequenceStatus.RUNNING
        if hasattr(self, "prefix_cache_queries"):
            self.prefix_cache_queries += len(seq)
            self.prefix_cache_hits += seq.num_cached_tokens
    try:
        from kvlab.engine.scheduler import Schedule, ScheduledChunk
    except ImportError:                        # the engine before its explicit step
        return decodes + prefills
    items = []
    for seq in decodes + prefills:             # the step's plan; planning it is advancing it
        items.append(ScheduledChunk(seq, seq.num_computed_tokens, seq.num_scheduled_tokens))
        self.block_manager.register_computed(seq, len(seq))
        seq.num_computed_tokens = len(seq)
        seq.num_scheduled_tokens = 0
    return Schedule(items, self.block_manager.take_events(), len(preempted))


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
                          free_queue=None, on_discard=None):
    """A prefix-caching `BlockManager` whose block names, prefix lookup and free queue are a
    student's: `chain_hashes(token_ids, block_size, salt)` names the full blocks,
    `cached_prefix(block_manager, seq) -> [Block]` finds a sequence's cached blocks (as
    `BlockManager._cached_prefix`), `free_queue(block_ids)` builds the LRU queue. Any left None
    stays the engine's."""
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

    extra = {} if on_discard is None else {"on_discard": on_discard}
    bm = PluggedBlockManager(num_blocks, block_size, enable_prefix_caching=True, **extra)
    if free_queue is not None:
        bm.free_queue = QueueAdapter(free_queue(range(num_blocks)))
    return bm


def install_prefix_cache(llm, chain_hashes=None, cached_prefix=None, free_queue=None) -> None:
    """Give an idle `llm` (prefix caching on) a block manager built from a student's parts."""
    old = llm.block_manager
    if not old.enable_prefix_caching:
        raise ValueError("install_prefix_cache needs LLM(enable_prefix_caching=True)")
    new = plugged_block_manager(old.num_blocks, old.block_size, chain_hashes, cached_prefix, free_queue,
                                getattr(old, "on_discard", None))
    if getattr(old, "max_cached_first_blocks", None) is not None:
        new.max_cached_first_blocks = old.max_cached_first_blocks
    install_block_manager(llm, new)


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
                 device="cpu", attend=None):
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

    @classmethod
    def like(cls, cache, attend):
        return cls(cache.num_layers, cache.num_blocks, cache.block_size, cache.num_kv_heads,
                   cache.head_dim, dtype=cache.dtype, device=cache.device, attend=attend)

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
    """What one engine step needs from an `LLM`, for a student's `engine_step(parts)`:

    - `parts.schedule()` -> the step's `Chunk`s (`seq`, `start`, `num_tokens`, `end`): which
      sequences compute which positions (the scheduler has recorded that progress already);
    - `parts.block_size`;
    - `parts.forward(prepared)` runs the model over the paged cache on a `prepare_step` result and
      returns the logits of its `logit_indices` rows, [S, vocab];
    - `parts.sample(logits, seqs)` -> one token id per row (each sequence's SamplingParams);
    - `parts.stop_reason(seq)` -> "stop", "length" or None, after a token was appended;
    - `parts.finish(seq, reason)` frees the sequence's blocks and records it as finished.
    """

    def __init__(self, llm):
        self.llm = llm
        self.core = getattr(llm, "engine", None)      # the engine core (explicit-step engine)
        self.block_size = llm.block_size
        self._freed: list[int] = []

    @property
    def scheduler(self):
        return self.llm.scheduler

    def schedule(self) -> list[Chunk]:
        planned = self.scheduler.schedule()
        if self.core is not None:
            self._freed = list(planned.freed_blocks)
            if not planned.items:
                self.llm.runner.release(self._freed)
            return [Chunk(it.seq, it.start, it.num_tokens) for it in planned.items]
        chunks = []
        for seq in planned:
            start = seq.num_computed_tokens
            n = seq.num_scheduled_tokens or len(seq) - start
            seq.num_computed_tokens, seq.num_scheduled_tokens = start + n, 0
            chunks.append(Chunk(seq, start, n))
        return chunks

    def forward(self, prepared):
        llm = self.llm
        ids, pos, meta, logit_indices = to_metadata(prepared, llm.model.device)
        cache = llm.runner.cache
        if hasattr(cache, "begin_step"):
            cache.begin_step(meta, self._freed)
        else:
            cache.set_metadata(meta)
        self._freed = []
        try:
            with torch.inference_mode():
                return llm.model(ids, positions=pos, cache=cache, logit_indices=logit_indices)
        finally:
            if hasattr(cache, "end_step"):
                cache.end_step()
            else:
                cache.metadata = None

    def sample(self, logits, seqs):
        from kvlab.engine.sampling import sample

        gens = (self.core or self.llm)._generators
        return sample(logits, [s.sampling_params for s in seqs], [gens.get(s.seq_id) for s in seqs])

    def stop_reason(self, seq):
        return (self.core or self.llm)._stop_reason(seq)

    def finish(self, seq, reason):
        import time

        now = time.perf_counter()
        if seq.first_token_time is None and seq.num_completion_tokens:
            seq.first_token_time = now
        if self.core is not None:
            self.core._finish(seq, reason, now)
        else:
            seq.finish_time = now
            self.llm._finish(seq, reason)


def install_step(llm, engine_step) -> None:
    """Make `llm.generate` / `llm.step` run `engine_step(parts) -> [(seq, token), ...]` each step."""
    import time

    parts = EngineParts(llm)

    def produced():
        out = list(engine_step(parts))
        now = time.perf_counter()
        for seq, _ in out:
            if seq.first_token_time is None:
                seq.first_token_time = now
        llm.metrics.generation_tokens += len(out)
        return out

    if parts.core is None:
        llm._step = produced
        return
    from kvlab.engine.core import StepOutput

    core = parts.core

    def step():
        outputs = [StepOutput(seq, []) for seq in core._aborted]
        core._aborted = []
        outputs += [StepOutput(seq, [tok]) for seq, tok in produced()]
        llm.runner.release(core.scheduler.take_events())
        return outputs

    core.step = step
