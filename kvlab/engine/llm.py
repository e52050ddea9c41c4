"""`kvlab.LLM`: the paged engine behind an API shaped like vLLM's, so code ports both ways.

    llm = kvlab.LLM()                                      # the course model, paged KV cache
    outs = llm.generate(["Hello", "The capital"], kvlab.SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text

Lower level, streaming: `rid = llm.add_request(prompt, params)`, then `llm.step()` until
`llm.has_unfinished_requests()` is false; each step returns a RequestOutput for every request that
produced a token (`new_token_ids`). `llm.abort_request(rid)` frees a request's blocks at once.

One step = scheduler.schedule() (which sequences, which new tokens) -> model_runner.run() (one
packed forward over the paged cache) -> sample -> append, check stop conditions, free the blocks
of finished sequences. Every bad request is rejected at `add_request` with a ValueError naming
the limit; nothing about the running requests changes.
"""
from __future__ import annotations

import os
import time

import torch

from kvlab.cache.paged import PagedKVCache
from kvlab.engine.block_manager import BlockManager
from kvlab.engine.metrics import EngineMetrics, render_prometheus
from kvlab.engine.model_runner import ModelRunner
from kvlab.engine.outputs import CompletionOutput, RequestOutput
from kvlab.engine.sampling import SamplingParams, sample
from kvlab.engine.scheduler import Scheduler
from kvlab.engine.sequence import Sequence
from kvlab.quant.common import DEFAULT_BLOCK_SIZE, check_kv_cache_dtype

DEFAULT_KV_CACHE_BYTES = 512 * 2**20   # when neither num_kv_blocks nor kv_cache_memory_bytes is given


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


class LLM:
    def __init__(self, model=None, block_size: int | None = None, num_kv_blocks: int | None = None,
                 kv_cache_memory_bytes: int | None = None, max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 attention_backend: str = "torch", kv_cache_dtype: str = "auto",
                 enable_prefix_caching: bool = True, dtype: torch.dtype = torch.float32,
                 device="cpu", scheduling_policy=None, fp8_calibration=None,
                 enable_chunked_prefill: bool = False, keep_sink_token: bool = False):
        check_kv_cache_dtype(kv_cache_dtype)
        if block_size is None:
            block_size = DEFAULT_BLOCK_SIZE[kv_cache_dtype]
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
        self.block_size, self.kv_cache_dtype = block_size, kv_cache_dtype
        self.eos_token_id = cfg.eos_token_id if cfg.eos_token_id is not None else \
            getattr(self.tokenizer, "eos_token_id", None)

        if kv_cache_dtype == "auto":
            cache_cls, extra = PagedKVCache, {}
        else:
            from kvlab.quant.paged import QuantizedPagedKVCache
            cache_cls, extra = QuantizedPagedKVCache, {"kv_cache_dtype": kv_cache_dtype}
        if fp8_calibration is not None and kv_cache_dtype != "fp8":
            raise ValueError(f"fp8_calibration is only for kv_cache_dtype='fp8', not {kv_cache_dtype!r}")
        shape = dict(num_layers=cfg.num_layers, block_size=block_size,
                     num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
        self.bytes_per_block = cache_cls.bytes_per_block(**shape, dtype=self.model.dtype, **extra)
        if num_kv_blocks is None:
            budget = kv_cache_memory_bytes
            if budget is None:
                full = -(-max_num_seqs * self.max_model_len // block_size) * self.bytes_per_block
                budget = min(full, DEFAULT_KV_CACHE_BYTES)
            num_kv_blocks = int(budget // self.bytes_per_block)
            if num_kv_blocks <= 0:
                raise ValueError(f"kv_cache_memory_bytes={budget} is less than one block "
                                 f"({self.bytes_per_block} bytes at block_size={block_size})")
        if num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {num_kv_blocks}")
        self.num_kv_blocks = num_kv_blocks
        if fp8_calibration is not None:
            extra["fp8_calibration"] = fp8_calibration
        if keep_sink_token:
            if kv_cache_dtype == "auto":
                raise ValueError("keep_sink_token keeps a quantized cache's first token in full "
                                 "precision: it needs kv_cache_dtype int8, fp8, int4 or int2, not 'auto'")
            extra["keep_sink_token"] = keep_sink_token
        self.cache = cache_cls(num_blocks=num_kv_blocks, **shape, dtype=self.model.dtype,
                               device=self.model.device, attention_backend=attention_backend, **extra)
        self.block_manager = BlockManager(num_kv_blocks, block_size, enable_prefix_caching,
                                          on_discard=getattr(self.cache, "discard_block", None))
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, self.max_num_batched_tokens,
                                   scheduling_policy, enable_chunked_prefill)
        self.runner = ModelRunner(self.model, self.cache)
        self.metrics = EngineMetrics()
        self._generators: dict[int, torch.Generator] = {}
        self._seqs: dict[str, Sequence] = {}

    # ---- requests --------------------------------------------------------------------------
    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this model has none, pass token ids")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.flatten().tolist()
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        return None, list(prompt)

    def _make_sequence(self, prompt, sampling_params, request_id=None, cache_salt=None) -> Sequence:
        """Validate one request; every limit it breaks is named in the ValueError."""
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self._tokenize(prompt)
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
        if need > self.num_kv_blocks:
            raise ValueError(f"the request needs up to {need} KV blocks ({longest} tokens at block_size="
                             f"{self.block_size}) but the pool has only num_kv_blocks={self.num_kv_blocks}")
        if request_id is not None and str(request_id) in self._seqs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        return Sequence(ids, params, None if request_id is None else str(request_id), text, cache_salt)

    def add_request(self, prompt, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None) -> str:
        """Queue one request (text or token ids); returns its request_id."""
        seq = self._make_sequence(prompt, sampling_params, request_id, cache_salt)
        self._enqueue(seq)
        return seq.request_id

    def _enqueue(self, seq: Sequence) -> None:
        if seq.sampling_params.seed is not None:
            g = torch.Generator(device=self.model.device)
            g.manual_seed(seq.sampling_params.seed)
            self._generators[seq.seq_id] = g
        self._seqs[seq.request_id] = seq
        self.metrics.prompt_tokens += seq.num_prompt_tokens
        self.scheduler.add(seq)

    def abort_request(self, request_id) -> None:
        """Stop requests now (a str or a list of them); their blocks are freed. Unknown ids are ignored."""
        for rid in list(request_id) if isinstance(request_id, (list, tuple, set)) else [request_id]:
            seq = self.scheduler.find(str(rid))
            if seq is not None:
                seq.finish_time = time.perf_counter()
                self._finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop --------------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.metrics.observe_finished(seq)
        self._generators.pop(seq.seq_id, None)
        self._seqs.pop(seq.request_id, None)

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

    def _step(self) -> list[tuple[Sequence, int]]:
        seqs = self.scheduler.schedule()
        if not seqs:
            if self.scheduler.waiting:
                raise RuntimeError("no request could be scheduled although the engine is idle")
            return []
        logits = self.runner.run(seqs)
        done = [i for i, s in enumerate(seqs) if s.num_computed_tokens == len(s)]  # not mid-prompt
        if len(done) < len(seqs):
            seqs, logits = [seqs[i] for i in done], logits[done]
            if not seqs:
                return []
        tokens = sample(logits, [s.sampling_params for s in seqs],
                        [self._generators.get(s.seq_id) for s in seqs])
        now = time.perf_counter()
        for seq, tok in zip(seqs, tokens):
            seq.append_token(tok)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._stop_reason(seq)
            if reason is not None:
                seq.finish_time = now
                self._finish(seq, reason)
        self.metrics.generation_tokens += len(seqs)
        return list(zip(seqs, tokens))

    def step(self) -> list[RequestOutput]:
        """Run one engine step; a RequestOutput for each request that produced a token."""
        return [self._output(seq, [tok]) for seq, tok in self._step()]

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
        """Run prompts (a string, a token-id list, or a list of them) to completion; outputs in order.

        All prompts are validated before any is queued: a bad one raises ValueError (naming its
        index) and leaves the engine as it was.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
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
            self._enqueue(seq)
        bar = None
        if use_tqdm:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=len(seqs), desc="generate", unit="req")
            except ImportError:
                pass
        pending = {s.seq_id for s in seqs}
        while pending:
            for seq, _ in self._step():
                if seq.is_finished and seq.seq_id in pending:
                    pending.discard(seq.seq_id)
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
        """vLLM-named gauges, counters and histograms (see kvlab/engine/metrics.py)."""
        m, s = self.metrics, self.scheduler
        return {
            "kv_cache_usage_perc": self.block_manager.usage(),
            "num_requests_running": len(s.running),
            "num_requests_waiting": len(s.waiting),
            "num_preemptions": s.num_preemptions,
            "prompt_tokens": m.prompt_tokens,
            "generation_tokens": m.generation_tokens,
            "num_requests_finished": m.num_requests_finished,
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits,
            "time_to_first_token_seconds": m.time_to_first_token_seconds,
            "time_per_output_token_seconds": m.time_per_output_token_seconds,
            "e2e_request_latency_seconds": m.e2e_request_latency_seconds,
        }

    def prometheus_metrics(self) -> str:
        """get_metrics() in Prometheus text exposition format."""
        return render_prometheus(self.get_metrics())
