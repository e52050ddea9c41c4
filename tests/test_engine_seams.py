"""The engine's seams (kvlab/engine/protocols.py): each takes a name, an object or (scheduler,
engine core) a factory that follows a documented protocol, with no kvlab base class. A plugged-in
part must serve the real engine and give the reference's greedy tokens; the radix cache must give
the block-hash cache's tokens."""
from collections import deque

import pytest
import torch
from helpers import GREEDY
from helpers import random_prompts as _prompts

from kvlab import LLM, SamplingParams
from kvlab.cache.base import causal_attention
from kvlab.cache.codec import Int8PerToken
from kvlab.engine.core import EngineCore, StepOutput
from kvlab.engine.metrics import EngineMetrics
from kvlab.engine.radix_cache import RadixCache
from kvlab.engine.sampling import sample
from kvlab.engine.scheduler import Schedule, ScheduledChunk, Scheduler
from kvlab.engine.sequence import SequenceStatus


# ---- the smallest objects that satisfy each protocol (docs/architecture.md shows them) ----------
class FreeList:
    """A BlockAllocator with no sharing: a free list of blocks."""

    def __init__(self, num_blocks, block_size):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free, self.dropped = list(range(num_blocks)), []

    def _need(self, seq, num_tokens):
        return -(-num_tokens // self.block_size) - len(seq.block_table)

    def lookup(self, seq):
        return 0

    def can_allocate(self, seq, num_tokens):
        return self._need(seq, num_tokens) <= len(self.free)

    can_append = can_allocate

    def allocate(self, seq, num_tokens):
        seq.num_cached_tokens = 0
        self.may_append(seq, num_tokens)

    def may_append(self, seq, num_tokens):
        for _ in range(self._need(seq, num_tokens)):
            seq.block_table.append(self.free.pop())

    def register_computed(self, seq, num_computed):
        pass

    def deallocate(self, seq):
        self.free += seq.block_table
        self.dropped += seq.block_table
        seq.block_table.clear()

    def take_events(self):
        events, self.dropped = self.dropped, []
        return events

    def usage(self):
        return 1 - len(self.free) / self.num_blocks


class Half:
    """A KVFormat: K and V stored as float16."""

    def storage(self, num_blocks, block_size, num_kv_heads, head_dim, device):
        return {n: torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.float16,
                               device=device) for n in ("k", "v")}

    def write(self, store, k, v, slots):
        for name, x in (("k", k), ("v", v)):
            store[name].view(-1, *x.shape[1:]).index_copy_(0, slots, x.to(torch.float16))

    def read(self, store, blocks, dtype):
        return store["k"][blocks].to(dtype), store["v"][blocks].to(dtype)


class LoopBackend:
    """An AttentionBackend written token by token: write each slot, gather each context."""

    def reshape_and_cache(self, k, v, k_cache, v_cache, slot_mapping):
        bs = k_cache.shape[1]
        for i, s in enumerate(slot_mapping.tolist()):
            if s >= 0:
                k_cache[s // bs, s % bs] = k[i]
                v_cache[s // bs, s % bs] = v[i]

    def paged_prefill_attention(self, q, k_cache, v_cache, block_tables, query_start_loc,
                                context_lens, scale):
        bs, out = k_cache.shape[1], torch.empty_like(q)
        qsl = query_start_loc.tolist()
        for s, n in enumerate(context_lens.tolist()):
            table = block_tables[s].tolist()
            k = torch.stack([k_cache[table[p // bs], p % bs] for p in range(n)])
            v = torch.stack([v_cache[table[p // bs], p % bs] for p in range(n)])
            a, b = qsl[s], qsl[s + 1]
            out[a:b] = causal_attention(q[None, a:b], k[None], v[None], q_offset=n - (b - a))[0]
        return out

    def paged_decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        qsl = torch.arange(q.shape[0] + 1)
        return self.paged_prefill_attention(q, k_cache, v_cache, block_tables, qsl, context_lens, scale)


class OneAtATime:
    """A SchedulerLike: one request at a time, its whole prompt then its decodes (no batching, so
    no preemption: the LLM refuses a request that alone does not fit the pool)."""

    def __init__(self, block_manager, **options):
        self.block_manager, self.waiting, self.running, self.num_preemptions = block_manager, deque(), [], 0

    def add(self, seq):
        self.waiting.append(seq)

    def has_unfinished(self):
        return bool(self.waiting or self.running)

    def schedule(self):
        bm = self.block_manager
        if not self.running and self.waiting:
            seq = self.waiting.popleft()
            bm.allocate(seq, len(seq))                     # sets seq.num_cached_tokens (hits)
            seq.num_computed_tokens = seq.num_cached_tokens
            self.running.append(seq)
        items = []
        for seq in self.running:
            bm.may_append(seq, len(seq))
            bm.register_computed(seq, len(seq))
            items.append(ScheduledChunk(seq, seq.num_computed_tokens, len(seq) - seq.num_computed_tokens))
            seq.num_computed_tokens = len(seq)             # planning the step is advancing it
        return Schedule(items, bm.take_events())

    def rollback(self, schedule):
        for item in schedule.items:
            self.block_manager.register_computed(item.seq, item.start)
            self.block_manager.deallocate(item.seq)
            item.seq.num_computed_tokens = 0
            self.running.remove(item.seq)
            self.waiting.appendleft(item.seq)

    def finish(self, seq, reason):
        if seq in self.running:
            self.block_manager.deallocate(seq)
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def take_events(self):
        return self.block_manager.take_events()


class PlainCore:
    """An EngineCoreLike: schedule, run, sample, append, stop at EOS or max_tokens, finish (no
    seeds, stop strings or latency metrics)."""

    def __init__(self, scheduler, runner, max_model_len, eos_token_id, **options):
        self.scheduler, self.runner, self.eos_token_id = scheduler, runner, eos_token_id
        self.max_model_len, self.metrics, self.requests, self.aborted = max_model_len, EngineMetrics(), {}, []

    def add(self, seq):
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id):
        seq = self.requests.get(request_id)
        if seq is not None:
            self._finish(seq, "abort")
            self.aborted.append(seq)

    def has_unfinished(self):
        return self.scheduler.has_unfinished() or bool(self.aborted)

    def step(self):
        outputs, self.aborted = [StepOutput(seq, []) for seq in self.aborted], []
        schedule = self.scheduler.schedule()
        logits = self.runner.run(schedule)                 # an empty schedule only frees blocks
        seqs = [item.seq for item in schedule.items if item.samples]
        tokens = sample(logits, [s.sampling_params for s in seqs], [None] * len(seqs)) if seqs else []
        for seq, token in zip(seqs, tokens):
            seq.append_token(token)
            p = seq.sampling_params
            if token == self.eos_token_id and not p.ignore_eos:
                self._finish(seq, "stop")
            elif seq.num_completion_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
                self._finish(seq, "length")
            outputs.append(StepOutput(seq, [token]))
        self.runner.release(self.scheduler.take_events())
        return outputs

    def _finish(self, seq, reason):
        self.scheduler.finish(seq, reason)
        del self.requests[seq.request_id]


def _run(llm, prompts, n=6):
    outs = llm.generate(prompts, SamplingParams(max_tokens=n, **GREEDY), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], [o.num_cached_tokens for o in outs]


# ---- the tests -------------------------------------------------------------------------------
def test_a_student_block_allocator_serves_the_engine(model64, reference):
    prompts = _prompts([5, 13, 9, 22], seed=1)
    llm = LLM(model64, prefix_cache=FreeList(12, 4), max_model_len=64)      # small: preemption
    assert llm.num_kv_blocks == 12 and llm.block_size == 4
    toks, _ = _run(llm, prompts, 10)
    assert toks == [reference(p, 10) for p in prompts]
    assert llm.get_metrics()["num_preemptions"] > 0 and len(llm.block_manager.free) == 12
    with pytest.raises(ValueError, match="prefix_cache.*lookup"):
        LLM(model64, prefix_cache=object())


@pytest.mark.parametrize("policy", ["shortest_prompt_first", lambda waiting: waiting[::-1]])
def test_scheduling_policy_by_name_or_callable(model64, reference, policy):
    prompts = _prompts([9, 3, 14, 6], seed=2)
    llm = LLM(model64, block_size=4, num_kv_blocks=64, max_model_len=64, max_num_seqs=1,
              scheduling_policy=policy)
    order = []
    for i, p in enumerate(prompts):
        llm.add_request(p, SamplingParams(max_tokens=2, **GREEDY), request_id=str(i))
    while llm.has_unfinished_requests():
        order += [o.request_id for o in llm.step() if o.finished]
    assert order == (["1", "3", "0", "2"] if policy == "shortest_prompt_first" else ["3", "2", "1", "0"])
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(model64, num_kv_blocks=8, max_model_len=64, scheduling_policy="nope")


def test_a_codec_runs_as_the_kv_format(model64, reference):
    prompts = _prompts([7, 18, 3], seed=3)
    ref = LLM(model64, block_size=4, num_kv_blocks=32, max_model_len=64, kv_cache_dtype="int8")
    mine = LLM(model64, block_size=4, num_kv_blocks=32, max_model_len=64, kv_cache_dtype=Int8PerToken())
    assert mine.bytes_per_block == ref.bytes_per_block
    assert _run(mine, prompts) == _run(ref, prompts)
    half = LLM(model64, block_size=4, kv_cache_memory_bytes=1 << 16, max_model_len=64, kv_cache_dtype=Half())
    auto = LLM(model64, block_size=4, kv_cache_memory_bytes=1 << 16, max_model_len=64)
    assert half.num_kv_blocks == 4 * auto.num_kv_blocks      # float64 model: float16 is 4x denser
    assert half.kv_cache_bytes_allocated <= 1 << 16
    toks, _ = _run(half, prompts)
    assert sum(t == reference(p, 6) for t, p in zip(toks, prompts)) >= 2   # float16 may flip a tie
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(model64, num_kv_blocks=8, max_model_len=64, kv_cache_dtype="int3")


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_an_attention_backend_object(model64, kv_cache_dtype):
    prompts = _prompts([6, 11], seed=4)
    kw = dict(block_size=4, num_kv_blocks=32, max_model_len=64, kv_cache_dtype=kv_cache_dtype)
    assert _run(LLM(model64, attention_backend=LoopBackend(), **kw), prompts) == \
        _run(LLM(model64, **kw), prompts)
    with pytest.raises(ValueError, match="attention_backend"):
        LLM(model64, num_kv_blocks=8, max_model_len=64, attention_backend=object())


def test_course_backend_parts_plug_one_function_into_the_constructor_seam(model64):
    """kvlab.course.plugins.BackendParts (chapter 10, exercise 5): the functions given, kvlab's
    torch reference for the others; the engine calls the given one in every layer of every step."""
    from kvlab.course.plugins import BackendParts

    calls = []

    def write(k, v, k_cache, v_cache, slot_mapping):
        calls.append(len(slot_mapping))
        LoopBackend().reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)

    prompts = _prompts([5, 9], seed=7)
    kw = dict(block_size=4, num_kv_blocks=32, max_model_len=64)
    llm = LLM(model64, attention_backend=BackendParts(reshape_and_cache=write), **kw)
    ref = LLM(model64, **kw)
    assert _run(llm, prompts, n=3) == _run(ref, prompts, n=3)
    assert calls == [14] * model64.config.num_layers + [2] * 2 * model64.config.num_layers
    for a, b in zip(llm.cache.k_cache + llm.cache.v_cache, ref.cache.k_cache + ref.cache.v_cache):
        assert torch.equal(a, b)


def test_radix_prefix_cache_equals_the_block_hash_cache(model64, reference):
    prompts = _prompts([3, 9, 6, 12, 1, 7], seed=5, shared=21)
    radix = LLM(model64, prefix_cache="radix", num_kv_blocks=400, max_model_len=64)
    block = LLM(model64, block_size=4, num_kv_blocks=100, max_model_len=64)
    assert isinstance(radix.block_manager, RadixCache) and radix.block_size == 1
    got = {}
    for name, llm in (("radix", radix), ("hash", block)):
        toks, cached = [], []
        for batch in (prompts[:1], prompts[1:]):       # the first request computes the prefix
            t, c = _run(llm, batch)
            toks += t
            cached += c
        got[name] = toks
        assert cached[0] == 0 and all(c >= 20 for c in cached[1:])   # radix: 21, blocks of 4: 20
        m = llm.get_metrics()
        assert m["prefix_cache_hits"] == sum(cached) and m["prefix_cache_queries"] > 0
    assert got["radix"] == got["hash"] == [reference(p, 6) for p in prompts]
    assert radix.reset_prefix_cache() and block.reset_prefix_cache()
    assert _run(radix, prompts[1:2])[1] == [0] and _run(block, prompts[1:2])[1] == [0]
    with pytest.raises(ValueError, match="radix"):
        LLM(model64, prefix_cache="radix", kv_cache_dtype="int4", max_model_len=64, num_kv_blocks=64)


def test_reset_prefix_cache_refuses_while_requests_hold_blocks(model64):
    llm = LLM(model64, block_size=4, num_kv_blocks=32, max_model_len=64)
    p = _prompts([12], seed=6)[0]
    llm.generate([p], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
    llm.add_request(p, SamplingParams(max_tokens=4, **GREEDY))
    llm.step()
    assert llm.reset_prefix_cache() is False
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.reset_prefix_cache() is True and len(llm.block_manager.cached) == 0


def test_a_scheduler_factory_serves_the_engine(model64, reference):
    prompts = _prompts([5, 13, 9, 22], seed=8, shared=8)
    kw = dict(block_size=4, num_kv_blocks=16, max_model_len=64)
    llm = LLM(model64, scheduler=OneAtATime, **kw)
    toks, cached = _run(llm, prompts, 8)
    assert toks == [reference(p, 8) for p in prompts]
    assert cached[0] == 0 and all(c == 8 for c in cached[1:])        # the allocator's prefix hits
    assert isinstance(llm.scheduler, OneAtATime) and llm.block_manager.num_free_blocks == 16
    explicit, default = LLM(model64, scheduler=Scheduler, **kw), LLM(model64, **kw)
    assert type(explicit.scheduler) is Scheduler
    assert _run(explicit, prompts, 8) == _run(default, prompts, 8)
    with pytest.raises(ValueError, match="scheduler must be a class or a callable"):
        LLM(model64, scheduler=OneAtATime(None), **kw)
    with pytest.raises(ValueError, match="scheduler: a scheduler needs add, schedule, rollback, .*num_preemptions"):
        LLM(model64, scheduler=lambda block_manager, **options: deque(), **kw)


def test_an_engine_core_factory_runs_the_step_loop(model64, reference):
    prompts = _prompts([7, 18, 3], seed=9)
    kw = dict(block_size=4, num_kv_blocks=12, max_model_len=64)             # small: preemption
    llm = LLM(model64, engine_core=PlainCore, **kw)
    toks, _ = _run(llm, prompts, 10)
    assert toks == [reference(p, 10) for p in prompts]
    assert llm.get_metrics()["num_preemptions"] > 0 and llm.block_manager.num_free_blocks == 12
    llm.add_request(prompts[0], SamplingParams(max_tokens=4, **GREEDY), request_id="a")
    llm.step()
    llm.abort_request("a")
    (out,) = llm.step()
    assert out.finished and out.outputs[0].finish_reason == "abort" and not llm.has_unfinished_requests()
    explicit, default = LLM(model64, engine_core=EngineCore, **kw), LLM(model64, **kw)
    assert type(explicit.engine) is EngineCore
    assert _run(explicit, prompts, 10) == _run(default, prompts, 10)
    with pytest.raises(ValueError, match="engine_core must be a class or a callable"):
        LLM(model64, engine_core="mine", **kw)
    with pytest.raises(ValueError, match="engine_core: an engine core needs abort, step, .*requests"):
        LLM(model64, engine_core=lambda scheduler, **options: scheduler, **kw)


def test_course_adapters_enter_through_the_scheduler_and_engine_core_seams(model64):
    """kvlab.course.plugins.step_loop (chapter 11) and step_scheduler (chapter 07) are factories
    for the seams: a step loop written on EngineParts serves chunked prefill with preemption, and
    a schedule_step adapter refuses the options it does not do."""
    from kvlab.course.fixtures import reference_prepare
    from kvlab.course.plugins import StepLoopCore, step_loop, step_scheduler

    def engine_step(parts):
        chunks = parts.schedule()
        if not chunks:
            return []
        logits = parts.forward(reference_prepare(chunks, parts.block_size))
        done = [i for i, c in enumerate(chunks) if c.end == len(c.seq)]
        seqs = [chunks[i].seq for i in done]
        out = []
        for seq, tok in zip(seqs, parts.sample(logits[done], seqs) if done else []):
            seq.append_token(tok)
            reason = parts.stop_reason(seq)
            if reason is not None:
                parts.finish(seq, reason)
            out.append((seq, tok))
        return out

    prompts = _prompts([7, 18, 3, 11], seed=10)
    kw = dict(block_size=4, num_kv_blocks=12, max_model_len=64, enable_chunked_prefill=True,
              max_num_batched_tokens=8, max_num_seqs=4)
    llm = LLM(model64, engine_core=step_loop(engine_step), **kw)
    assert isinstance(llm.engine, StepLoopCore)
    assert _run(llm, prompts, 8) == _run(LLM(model64, **kw), prompts, 8)
    assert llm.get_metrics()["num_preemptions"] > 0 and llm.block_manager.num_free_blocks == 12
    with pytest.raises(ValueError, match="enable_chunked_prefill"):
        LLM(model64, scheduler=step_scheduler(lambda *a: ([], [], [])), **kw)


class TinyCache:
    """The smallest paged KV cache: pools, a write and a gather-then-attend per sequence, in plain
    PyTorch (the `kv_cache` seam builds it with PagedKVCache's keyword arguments)."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device,
                 attention_backend=None):
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, torch.device(device)
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.k + self.v)
        self.meta = None

    def begin_step(self, metadata, freed_blocks=()):
        self.meta = metadata

    def end_step(self):
        self.meta = None

    def advance(self, num_tokens):
        pass                             # positions come with each step's metadata

    def attend(self, layer, q, k, v):
        m, bs = self.meta, self.block_size
        self.k[layer][m.slot_mapping], self.v[layer][m.slot_mapping] = k[0], v[0]
        out, qsl = [], m.query_start_loc.tolist()
        for s, n in enumerate(m.context_lens.tolist()):
            slots = [int(m.block_tables[s, i // bs]) * bs + i % bs for i in range(n)]
            a, b = qsl[s], qsl[s + 1]
            out.append(causal_attention(q[:, a:b], self.k[layer][slots][None], self.v[layer][slots][None],
                                        q_offset=n - (b - a)))
        return torch.cat(out, 1)


def test_a_kv_cache_factory_serves_the_engine(model64, reference):
    prompts = _prompts([5, 13, 9, 22], seed=8)
    kw = dict(block_size=4, num_kv_blocks=16, max_model_len=64)
    llm = LLM(model64, kv_cache=TinyCache, **kw)
    assert isinstance(llm.cache, TinyCache) and llm.runner.cache is llm.cache
    assert _run(llm, prompts, 8)[0] == [reference(p, 8) for p in prompts]
    with pytest.raises(ValueError, match="kv_cache must be a class or a callable"):
        LLM(model64, kv_cache=TinyCache(1, 1, 1, 1, 1, torch.float32, "cpu"), **kw)
    with pytest.raises(ValueError, match="a paged KV cache needs attend, advance, begin_step, end_step, block_size"):
        LLM(model64, kv_cache=lambda **shape: object(), **kw)
    with pytest.raises(ValueError, match="the engine planned 16 of 4"):
        LLM(model64, kv_cache=lambda num_blocks, **rest: TinyCache(num_blocks=8, **rest), **kw)
    with pytest.raises(ValueError, match="kv_cache: a plugged cache does not keep"):
        LLM(model64, kv_cache=TinyCache, kv_budget_tokens=8, **kw)
