"""`kvlab.LLM`: the paged engine behind an API shaped like vLLM's, so code ports both ways.

    llm = kvlab.LLM()                                      # the course model, paged KV cache
    outs = llm.generate(["Hello", "The capital"], kvlab.SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text

Lower level, streaming: `rid = llm.add_request(prompt, params)`, then `llm.step()` until
`llm.has_unfinished_requests()` is false; each step returns a RequestOutput for every request that
produced a token (`new_token_ids`) or was aborted since the last step (finish reason "abort").
`llm.abort_request(rid)` frees a request's blocks at once.

This module is the API only: requests in, RequestOutputs out. The step itself (schedule, run,
sample, stop, finish) is kvlab/engine/core.py; how the KV memory is split, kv_budget.py; the
seams (scheduling policy, prefix cache, KV format, attention backend, scheduler, engine core),
protocols.py. Every bad
request is rejected at `add_request` with a ValueError naming the limit; nothing about the
running requests changes.
"""
from __future__ import annotations

import os

import torch

from kvlab.cache.compaction import KVCompactor
from kvlab.cache.paged import PagedKVCache
from kvlab.engine.block_manager import BlockManager
from kvlab.engine.core import EngineCore
from kvlab.engine.kv_budget import DEFAULT_KV_CACHE_BYTES, kv_costs, plan_kv_pool
from kvlab.engine.kv_eviction import Evictor, check_combination, eviction_config, max_blocks_per_sequence
from kvlab.engine.kv_groups import HybridBlockManager, group_layout
from kvlab.engine.metrics import render_prometheus
from kvlab.engine.model_runner import ModelRunner
from kvlab.engine.outputs import CompletionOutput, RequestOutput
from kvlab.engine.protocols import (
    BLOCK_ALLOCATOR_METHODS,
    ENGINE_CORE_ATTRIBUTES,
    ENGINE_CORE_METHODS,
    KV_CACHE_ATTRIBUTES,
    KV_CACHE_METHODS,
    SCHEDULER_ATTRIBUTES,
    SCHEDULER_METHODS,
    build_part,
    check_factory,
    check_protocol,
)
from kvlab.engine.row_budget import RowBudget
from kvlab.engine.sampling import SamplingParams
from kvlab.engine.scheduler import Scheduler
from kvlab.engine.sequence import Sequence
from kvlab.quant.common import DEFAULT_BLOCK_SIZE, check_kv_cache_dtype

PREFIX_CACHES = ("hash", "radix", "none")


def _resolve_model(model, dtype, device):
    """None (the course model), a path, a (model, tokenizer) pair or a model -> (model, tokenizer)."""
    from kvlab.model.load import load_model

    if model is None:
        return load_model(device=device, dtype=dtype)
    if isinstance(model, (str, os.PathLike)):
        return load_model(str(model), device=device, dtype=dtype)
    if isinstance(model, (tuple, list)) and len(model) == 2:
        return model[0], model[1]
    if isinstance(model, torch.nn.Module):
        return model, None
    raise ValueError(f"model must be None, a path, a (model, tokenizer) pair or a model, got {type(model)}")


def _check_windowed(fmt, kv_cache_dtype, attention_backend, eviction) -> None:
    """A model with sliding-window layers runs on the model-dtype paged cache, whose backend takes
    `sliding_window=` (docs/architecture.md, "Sliding-window layers"); anything else is refused.
    The backends mask by cache index, which is the position difference only while the kept entries
    are consecutive: of the KV budgets, only kv_eviction='window' keeps them so."""
    from kvlab.attention import accepts_sliding_window, backend_module

    if eviction is not None and eviction.policy != "window":
        raise ValueError(f"kv_eviction={eviction.policy!r} with a model that has sliding-window layers: "
                         "the windows are masked by cache index, which a cut that keeps non-consecutive "
                         "entries shifts; use kv_eviction='window' (or no kv_budget_tokens)")

    if fmt != "auto":
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} with a model that has sliding-window layers: "
                         "only kv_cache_dtype='auto' applies the windows (the quantized and codec caches "
                         "do not); use kv_cache_dtype='auto'")
    if not accepts_sliding_window(backend_module(attention_backend)):
        raise ValueError(f"the model has sliding-window layers but attention_backend "
                         f"{type(attention_backend).__name__} takes no sliding_window= keyword in "
                         "paged_decode_attention and paged_prefill_attention")


class LLM:
    """kvlab.LLM(model=None, ...): see docs/architecture.md for every argument.

    The seams take a name or an object (kvlab/engine/protocols.py):
    `scheduling_policy` ("fcfs", "shortest_prompt_first" or a callable), `prefix_cache` ("hash":
    block-hash automatic prefix caching, "radix": SGLang-style radix tree at block_size 1, "none",
    or a BlockAllocator object), `kv_cache_dtype` ("auto", "int8", "fp8", "int4", "int2" or a
    KVFormat codec), `attention_backend` ("torch": the reference, "cpu": the same on the CPU's
    fused attention kernel, "triton", or an object with the three paged attention functions).

    A per-sequence KV budget (kvlab/engine/kv_eviction.py; docs/architecture.md, "KV eviction"):
    `kv_budget_tokens` entries kept per sequence (None: no budget, the engine as without it),
    `kv_eviction` "window" (default), "streaming" (with `num_sink_tokens`), "h2o" or "snapkv"
    (with `kv_eviction_window`, their recent / observation window; `kv_eviction_keep_top`, a
    function with `kvlab.evict.policy.keep_top_and_recent`'s signature, replaces their selection).

    A model whose layers mix attention types (config.sliding_windows with None and W entries, or
    several windows: Gemma 2) runs with one block table per layer group over one shared block pool,
    its windowed groups freeing out-of-window blocks (kvlab/engine/kv_groups.py); docs/architecture.md,
    "Sliding-window layers".

    Two more take a factory (a class or a callable, called with keyword arguments named as the
    kvlab class's parameters), because the LLM builds what they hold: `scheduler`
    (kvlab.engine.scheduler.Scheduler by default; built around the block allocator) and
    `engine_core` (kvlab.engine.core.EngineCore by default; the step loop, built around the
    scheduler and the model runner). With a KV budget the scheduler factory also gets `evictor=`.
    """

    def __init__(self, model=None, block_size: int | None = None, num_kv_blocks: int | None = None,
                 kv_cache_memory_bytes: int | None = None, max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 attention_backend="torch", kv_cache_dtype="auto",
                 enable_prefix_caching: bool = True, dtype: torch.dtype = torch.float32,
                 device="cpu", scheduling_policy=None, fp8_calibration=None,
                 enable_chunked_prefill: bool = False, keep_sink_token: bool = False,
                 prefix_cache=None, kv_budget_tokens: int | None = None, kv_eviction: str | None = None,
                 num_sink_tokens: int = 4, kv_eviction_window: int | None = None,
                 kv_eviction_keep_top=None, scheduler=None, engine_core=None, kv_cache=None):
        scheduler = Scheduler if scheduler is None else scheduler
        engine_core = EngineCore if engine_core is None else engine_core
        check_factory(scheduler, "scheduler", "scheduler")
        check_factory(engine_core, "engine core", "engine_core")
        if kv_cache is not None:
            check_factory(kv_cache, "paged KV cache", "kv_cache")
            if kv_budget_tokens is not None or keep_sink_token:
                raise ValueError("kv_cache: a plugged cache does not keep kvlab's per-sequence budget or "
                                 "sink rows; pass no kv_budget_tokens and keep_sink_token=False")
        codec = None if isinstance(kv_cache_dtype, str) else kv_cache_dtype
        if codec is None:
            check_kv_cache_dtype(kv_cache_dtype)
        fmt = "codec" if codec is not None else kv_cache_dtype
        allocator = None if prefix_cache is None or isinstance(prefix_cache, str) else prefix_cache
        if prefix_cache is None:
            prefix_cache = "hash" if enable_prefix_caching else "none"
        if allocator is not None:
            check_protocol(allocator, BLOCK_ALLOCATOR_METHODS, "block allocator", "prefix_cache")
            if block_size is not None and block_size != allocator.block_size:
                raise ValueError(f"block_size={block_size} but prefix_cache.block_size={allocator.block_size}")
            if num_kv_blocks is not None and num_kv_blocks != allocator.num_blocks:
                raise ValueError(f"num_kv_blocks={num_kv_blocks} but prefix_cache.num_blocks="
                                 f"{allocator.num_blocks}")
            block_size, num_kv_blocks = allocator.block_size, allocator.num_blocks
        elif prefix_cache not in PREFIX_CACHES:
            raise ValueError(f"prefix_cache must be one of {PREFIX_CACHES} or a block allocator "
                             f"object, got {prefix_cache!r}")
        elif prefix_cache == "radix":
            if block_size not in (None, 1):
                raise ValueError(f"prefix_cache='radix' shares single tokens: block_size must be 1, got {block_size}")
            if fmt in ("int4", "int2") or keep_sink_token:
                raise ValueError("prefix_cache='radix' keeps no per-block rows: use kv_cache_dtype "
                                 "'auto', 'int8' or 'fp8' without keep_sink_token")
            if enable_chunked_prefill:
                raise ValueError("prefix_cache='radix' does not do chunked prefill")
            block_size = 1
        if block_size is None:
            block_size = DEFAULT_BLOCK_SIZE.get(fmt, 16)
        if not isinstance(block_size, int) or block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two (1, 2, 4, ..., 128), got {block_size}")
        # a model passed in keeps its own dtype and device; dtype and device apply when loading
        self.model, self.tokenizer = _resolve_model(model, dtype, device)
        self.model.eval()
        cfg = self.config = self.model.config
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        if not 1 < self.max_model_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_model_len must be in [2, {cfg.max_position_embeddings}] (the model's "
                             f"max_position_embeddings), got {self.max_model_len}")
        self.max_num_batched_tokens = max_num_batched_tokens or max(self.max_model_len, 2048)
        if self.max_num_batched_tokens < self.max_model_len and not enable_chunked_prefill:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_model_len ({self.max_model_len}): a whole prompt is prefilled in one step "
                             "(or pass enable_chunked_prefill=True)")
        if max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
        self.block_size, self.kv_cache_dtype = block_size, kv_cache_dtype
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else \
            getattr(self.tokenizer, "eos_token_id", None)
        if fp8_calibration is not None and fmt != "fp8":
            raise ValueError(f"fp8_calibration is only for kv_cache_dtype='fp8', not {kv_cache_dtype!r}")
        if keep_sink_token and fmt in ("auto", "codec"):
            raise ValueError("keep_sink_token keeps a quantized cache's first token in full "
                             "precision: it needs kv_cache_dtype int8, fp8, int4 or int2")

        self.eviction = eviction_config(kv_budget_tokens, kv_eviction, num_sink_tokens,
                                         kv_eviction_window, block_size, kv_eviction_keep_top)
        if self.eviction is not None:
            check_combination(self.eviction, fmt, prefix_cache if allocator is None else "custom",
                              keep_sink_token)
        self.sliding_windows = getattr(cfg, "sliding_windows", None)
        self.kv_groups = None                # one block table per KV cache group (kv_groups.py)
        if self.sliding_windows is not None:
            _check_windowed(fmt, kv_cache_dtype, attention_backend, self.eviction)
            layout = group_layout(self.sliding_windows, cfg.num_layers)
            own_manager = self.eviction is None and allocator is None and prefix_cache in ("hash", "none")
            if own_manager and layout.num_groups > 1:
                # layer types mixed (Gemma 2: windowed and full) or several windows: one table per
                # group over one pool, each windowed group letting its out-of-window blocks go
                self.kv_groups = layout
            elif own_manager:
                # every layer windowed with one W (Mistral): keep the window (at least a block),
                # let out-of-window blocks go
                self.eviction = eviction_config(max(max(self.sliding_windows), block_size), "window",
                                                num_sink_tokens, None, block_size)

        # ---- the KV memory: blocks and rows, all inside one budget, allocated once -------------
        shape = dict(num_layers=cfg.num_layers, block_size=block_size,
                     num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
        # with groups a block id holds num_slots layers (the largest group's), not every layer
        layers = dict(shape, num_layers=self.kv_groups.num_slots) if self.kv_groups else shape
        costs = kv_costs(fmt, codec, layers, self.model.dtype, max_num_seqs,
                         self.max_num_batched_tokens, keep_sink_token)
        scored = self.eviction is not None and self.eviction.policy in ("h2o", "snapkv")
        if scored:                           # the attention each entry received, per slot
            costs.index_bytes_per_block += KVCompactor.score_bytes_per_block(
                cfg.num_layers, block_size, cfg.num_kv_heads, self.model.dtype)
        self.bytes_per_block = costs.bytes_per_block
        budget = kv_cache_memory_bytes
        if num_kv_blocks is None and budget is None:
            groups = self.kv_groups.num_groups if self.kv_groups else 1
            full = costs.plan(groups * -(-max_num_seqs * self.max_model_len // block_size)).total_bytes
            budget = min(full, DEFAULT_KV_CACHE_BYTES)
        plan = plan_kv_pool(costs, budget, num_kv_blocks)
        self.num_kv_blocks = plan.num_blocks
        self.kv_cache_memory_bytes = plan.total_bytes if budget is None else budget
        if kv_cache is None:
            self.cache = self._build_cache(fmt, codec, shape, plan, attention_backend, fp8_calibration,
                                           keep_sink_token)
        else:
            self.cache = self._plugged_cache(kv_cache, shape, plan, attention_backend)
        evictor = None
        if self.eviction is not None:
            self.cache.compactor = KVCompactor(cfg.num_layers, plan.num_blocks * block_size,
                                               cfg.num_kv_heads, self.model.dtype,
                                               self.model.device, scores=scored)
            evictor = Evictor(self.eviction)
        if allocator is None:
            if prefix_cache == "radix":
                from kvlab.engine.radix_cache import RadixCache
                allocator = RadixCache(plan.num_blocks)
            elif self.kv_groups is not None:
                allocator = HybridBlockManager(plan.num_blocks, block_size, self.kv_groups.windows,
                                               prefix_cache == "hash")
            else:
                allocator = BlockManager(plan.num_blocks, block_size, prefix_cache == "hash",
                                         max_cached_first_blocks=max_num_seqs if keep_sink_token else None)
        self.prefix_cache = prefix_cache if isinstance(prefix_cache, str) else "custom"
        rows = RowBudget(block_size, plan.residual_rows, plan.sink_rows)
        scheduler = build_part(scheduler, "scheduler", "scheduler", SCHEDULER_METHODS, SCHEDULER_ATTRIBUTES,
                               block_manager=allocator, max_num_seqs=max_num_seqs,
                               max_num_batched_tokens=self.max_num_batched_tokens,
                               scheduling_policy=scheduling_policy,
                               enable_chunked_prefill=enable_chunked_prefill, rows=rows,
                               **({} if evictor is None else {"evictor": evictor}))
        self.engine = build_part(engine_core, "engine core", "engine_core", ENGINE_CORE_METHODS,
                                 ENGINE_CORE_ATTRIBUTES, scheduler=scheduler,
                                 runner=ModelRunner(self.model, self.cache), max_model_len=self.max_model_len,
                                 eos_token_id=eos, tokenizer=self.tokenizer, device=self.model.device)

    def _plugged_cache(self, factory, shape, plan, attention_backend):
        """The `kv_cache` seam: the factory's cache, of the planned size, inside the KV budget."""
        if self.sliding_windows is not None:
            raise ValueError("kv_cache: a model with sliding-window layers needs kvlab's paged cache")
        cache = build_part(factory, "paged KV cache", "kv_cache", KV_CACHE_METHODS, KV_CACHE_ATTRIBUTES,
                           num_blocks=plan.num_blocks, **shape, dtype=self.model.dtype,
                           device=self.model.device, attention_backend=attention_backend)
        if (cache.num_blocks, cache.block_size) != (plan.num_blocks, self.block_size):
            raise ValueError(f"kv_cache: the cache has {cache.num_blocks} blocks of {cache.block_size}, the "
                             f"engine planned {plan.num_blocks} of {self.block_size}")
        if cache.nbytes > self.kv_cache_memory_bytes:
            raise ValueError(f"kv_cache: the cache holds {cache.nbytes} bytes, over kv_cache_memory_bytes="
                             f"{self.kv_cache_memory_bytes}")
        return cache

    def _build_cache(self, fmt, codec, shape, plan, attention_backend, fp8_calibration, keep_sink_token):
        kw = dict(num_blocks=plan.num_blocks, **shape, dtype=self.model.dtype, device=self.model.device,
                  attention_backend=attention_backend)
        if fmt == "auto":
            return PagedKVCache(**kw, sliding_windows=self.sliding_windows, kv_groups=self.kv_groups)
        if fmt == "codec":
            from kvlab.cache.codec import CodecPagedKVCache
            return CodecPagedKVCache(codec, **kw)
        from kvlab.cache.quantized import QuantizedPagedKVCache
        extra = {}
        if fp8_calibration is not None:
            extra["fp8_calibration"] = fp8_calibration
        if keep_sink_token:
            extra.update(keep_sink_token=True, sink_rows=plan.sink_rows)
        if plan.residual_rows:
            extra["residual_rows"] = plan.residual_rows
        return QuantizedPagedKVCache(**kw, kv_cache_dtype=fmt, **extra)

    # ---- who owns what: read-only views for the chapters and tests (parts of one's own go in
    # ---- through the constructor: scheduler=, prefix_cache=, engine_core=, kv_cache=) ----------
    @property
    def scheduler(self) -> Scheduler:
        return self.engine.scheduler

    @property
    def block_manager(self):
        """The scheduler's block allocator (it is its only owner)."""
        return self.engine.scheduler.block_manager

    @property
    def runner(self) -> ModelRunner:
        return self.engine.runner

    @runner.setter
    def runner(self, value) -> None:
        """Swap the runner (kvlab.engine.trace attaches a recording one)."""
        self.engine.runner = value

    @property
    def metrics(self):
        return self.engine.metrics

    @metrics.setter
    def metrics(self, value) -> None:
        self.engine.metrics = value

    @property
    def eos_token_id(self):
        return self.engine.eos_token_id

    @eos_token_id.setter
    def eos_token_id(self, value) -> None:
        self.engine.eos_token_id = value

    @property
    def kv_cache_bytes_allocated(self) -> int:
        """Bytes of every tensor the KV cache holds (blocks, scales, residual and sink rows),
        allocated when the engine was built; never more than `kv_cache_memory_bytes`."""
        return self.cache.nbytes

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (only while no request holds blocks); returns success."""
        reset = getattr(self.block_manager, "reset_prefix_cache", None)
        ok = bool(reset()) if reset is not None else False
        self.runner.release(self.engine.scheduler.take_events())
        return ok

    # ---- requests --------------------------------------------------------------------------
    def _tokenize(self, prompt) -> tuple[str | None, list[int], str | None]:
        """-> (text or None, token ids, cache_salt): a string, token ids, a 1-D tensor, or a
        dict {"prompt" or "prompt_token_ids": ..., "cache_salt": ...} as vLLM takes it."""
        salt = None
        if isinstance(prompt, dict):
            salt = prompt.get("cache_salt")
            if salt is not None and not isinstance(salt, str):
                raise ValueError(f"cache_salt must be a string, got {type(salt).__name__}")
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this model has none, pass token ids")
            return prompt, list(self.tokenizer.encode(prompt)), salt
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                raise ValueError(f"a tensor prompt must be 1-D token ids, got shape {tuple(prompt.shape)}")
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        return None, list(prompt), salt

    def _make_sequence(self, prompt, sampling_params, request_id=None, cache_salt=None) -> Sequence:
        """Validate one request; every limit it breaks is named in the ValueError."""
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        text, ids, salt = self._tokenize(prompt)
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        salt = cache_salt if cache_salt is not None else salt
        n, V = len(ids), self.config.vocab_size
        if n == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids must lie in [0, {V}) (the vocabulary), got {bad[:5]}")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens but max_model_len is {self.max_model_len} "
                             "(prompt plus at least one generated token must fit)")
        longest = min(n + params.max_tokens, self.max_model_len) - 1   # tokens whose K/V are stored
        need = -(-longest // self.block_size)
        if self.kv_groups is not None:       # every group may hold every block (a recompute's prefill)
            need *= self.kv_groups.num_groups
        if self.eviction is not None:        # the prompt's prefill, then at most the budget's blocks
            need = max(-(-n // self.block_size),
                       min(need, max_blocks_per_sequence(self.eviction, self.block_size)))
        if need > self.num_kv_blocks:
            raise ValueError(f"the request needs up to {need} KV blocks ({longest} tokens at block_size="
                             f"{self.block_size}) but the pool has only num_kv_blocks={self.num_kv_blocks}")
        if request_id is not None and str(request_id) in self.engine.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        return Sequence(ids, params, None if request_id is None else str(request_id), text, salt)

    def add_request(self, prompt, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None) -> str:
        """Queue one request (text, token ids or a dict prompt); returns its request_id."""
        seq = self._make_sequence(prompt, sampling_params, request_id, cache_salt)
        self.engine.add(seq)
        return seq.request_id

    def abort_request(self, request_id) -> None:
        """Stop requests now (a str or a list of them); their blocks are freed and the next step()
        reports them (finish reason "abort"). Unknown ids are ignored."""
        for rid in list(request_id) if isinstance(request_id, (list, tuple, set)) else [request_id]:
            self.engine.abort(str(rid))

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one engine step; a RequestOutput for each request that produced a token or was aborted."""
        return [self._output(o.seq, o.new_token_ids) for o in self.engine.step()]

    def _output(self, seq: Sequence, new_token_ids=()) -> RequestOutput:
        if seq.stopped_by_string or self.tokenizer is None:
            text = seq.text
        else:
            text = self.tokenizer.decode(seq.completion_token_ids, skip_special_tokens=True)
        comp = CompletionOutput(0, text, list(seq.completion_token_ids), seq.finish_reason)
        return RequestOutput(seq.request_id, seq.prompt, list(seq.prompt_token_ids), [comp],
                             seq.is_finished, seq.arrival_time, seq.first_token_time,
                             seq.finish_time, seq.num_cached_tokens, list(new_token_ids))

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run prompts (a string, token ids, a 1-D tensor, a dict prompt, or a list of them) to
        completion; outputs in order.

        All prompts are validated before any is queued: a bad one raises ValueError (naming its
        index) and leaves the engine as it was.
        """
        if isinstance(prompts, torch.Tensor):
            prompts = [prompts] if prompts.dim() == 1 else list(prompts)
        elif isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                                  and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                seqs.append(self._make_sequence(prompt, p))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        for seq in seqs:
            self.engine.add(seq)
        bar = None
        if use_tqdm:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=len(seqs), desc="generate", unit="req")
            except ImportError:
                pass
        pending = {s.seq_id for s in seqs}
        while pending:
            for out in self.engine.step():
                if out.seq.is_finished and out.seq.seq_id in pending:
                    pending.discard(out.seq.seq_id)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [self._output(s) for s in seqs]

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or a list of
        them, formatted with the model's chat template."""
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer with a chat template; this model has none")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in convs:
            ids = self.tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True)
            if not isinstance(ids, list):
                ids = ids["input_ids"]
            prompts.append([int(t) for t in ids])
        return self.generate(prompts, sampling_params, use_tqdm)

    # ---- metrics ---------------------------------------------------------------------------
    def get_metrics(self) -> dict:
        """vLLM-named gauges, counters and histograms (see kvlab/engine/metrics.py), each read
        from its one owner."""
        m, s, bm = self.metrics, self.scheduler, self.block_manager
        return {
            "kv_cache_usage_perc": bm.usage(),
            "num_requests_running": len(s.running),
            "num_requests_waiting": len(s.waiting),
            "num_preemptions": s.num_preemptions,
            "prompt_tokens": m.prompt_tokens,
            "generation_tokens": m.generation_tokens,
            "num_requests_finished": m.num_requests_finished,
            "num_requests_aborted": m.num_requests_aborted,
            "prefix_cache_queries": getattr(bm, "prefix_cache_queries", 0),
            "prefix_cache_hits": getattr(bm, "prefix_cache_hits", 0),
            "time_to_first_token_seconds": m.time_to_first_token_seconds,
            "time_per_output_token_seconds": m.time_per_output_token_seconds,
            "e2e_request_latency_seconds": m.e2e_request_latency_seconds,
        }

    def prometheus_metrics(self) -> str:
        """get_metrics() in Prometheus text exposition format."""
        return render_prometheus(self.get_metrics())

