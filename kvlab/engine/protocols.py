"""The seams of the engine: what an object must have to be plugged into `kvlab.LLM`.

Each seam is a constructor argument that takes a name (kvlab's own implementation) or an object
following the protocol below; nothing needs to inherit from a kvlab class. docs/architecture.md
("Seams") shows the smallest object satisfying each one.

    kvlab.LLM(scheduling_policy="fcfs" | callable,
              prefix_cache="hash" | "radix" | "none" | BlockAllocator object,
              kv_cache_dtype="auto" | "int8" | "fp8" | "int4" | "int2" | KVFormat object,
              attention_backend="torch" | "cpu" | "triton" | AttentionBackend object,
              scheduler=kvlab.engine.scheduler.Scheduler | a factory of a SchedulerLike,
              engine_core=kvlab.engine.core.EngineCore | a factory of an EngineCoreLike)

The last two are parts that hold parts the LLM builds (the scheduler owns the block allocator,
the engine core the scheduler and the model runner), so they take a factory, not an object: a
class or any callable, called with keyword arguments named as the kvlab class's parameters
(`build_part`). Passing the kvlab class itself is the default spelled out.

A sequence, as these objects see it, is a `kvlab.engine.sequence.Sequence`: `seq_id`,
`token_ids`, `len(seq)`, `cache_salt`, `block_table` (list of block ids, written by the block
allocator only), `num_cached_tokens` (written by the block allocator at `allocate`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

#: Reorders the waiting queue before admission: list[Sequence] -> the same sequences, reordered.
SchedulingPolicy = Callable[[list], list]


@runtime_checkable
class BlockAllocator(Protocol):
    """Which KV blocks each sequence owns (and, optionally, which it can share: a prefix cache).

    The scheduler is its only caller. A block id b names slots b * block_size .. + block_size - 1
    of the KV cache; `seq.block_table[i]` holds the sequence's tokens i * block_size onwards.
    """
    block_size: int
    num_blocks: int

    def lookup(self, seq) -> int:
        """Tokens at the start of seq already cached (a multiple of block_size, < len(seq)); pure."""

    def can_allocate(self, seq, num_tokens: int) -> bool:
        """Could `allocate(seq, num_tokens)` succeed now?"""

    def allocate(self, seq, num_tokens: int) -> None:
        """Fill seq.block_table to hold its first num_tokens tokens; set seq.num_cached_tokens."""

    def can_append(self, seq, num_tokens: int) -> bool:
        """Could `may_append(seq, num_tokens)` succeed now?"""

    def may_append(self, seq, num_tokens: int) -> None:
        """Grow seq.block_table to hold its first num_tokens tokens."""

    def register_computed(self, seq, num_computed: int) -> None:
        """The K/V of seq's first num_computed tokens now exist (a prefix cache may share them)."""

    def deallocate(self, seq) -> None:
        """seq finished, was aborted or preempted: drop its references, clear its block_table."""

    def take_events(self) -> list[int]:
        """Block ids whose contents were dropped since the last call (freed or evicted)."""

    def usage(self) -> float:
        """Fraction of blocks held by sequences (0..1)."""


@runtime_checkable
class AttentionBackend(Protocol):
    """Paged attention: three functions (a module or an object), as in kvlab/attention/."""

    def reshape_and_cache(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        """Write k, v [N, Hkv, D] into the flat slots slot_mapping [N] (< 0: skip)."""

    def paged_decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        """q [S, Hq, D], one query per sequence -> [S, Hq, D]."""

    def paged_prefill_attention(self, q, k_cache, v_cache, block_tables, query_start_loc,
                                context_lens, scale):
        """q [N, Hq, D], the new tokens of S sequences packed -> [N, Hq, D], causal."""


@runtime_checkable
class KVFormat(Protocol):
    """How K and V are stored in the paged pool: a codec (kvlab/cache/codec.py runs it).

    `storage` returns the named tensors of one layer, each with a leading block dimension
    [num_blocks, ...] (their bytes are the format's cost); `write` encodes k, v [N, Hkv, D] into
    the flat slots; `read` decodes whole blocks back to [len(blocks), block_size, Hkv, D].
    """

    def storage(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                device) -> dict[str, torch.Tensor]: ...

    def write(self, store: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
              slots: torch.Tensor) -> None: ...

    def read(self, store: dict[str, torch.Tensor], blocks: torch.Tensor,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class SchedulerLike(Protocol):
    """Which tokens of which sequences the next step computes (kvlab/engine/scheduler.py).

    Built by `LLM(scheduler=factory)` as `factory(block_manager=, max_num_seqs=,
    max_num_batched_tokens=, scheduling_policy=, enable_chunked_prefill=, rows=)`: it owns the
    block allocator the LLM built (`block_manager`, a BlockAllocator) and is its only caller.
    A factory that does not implement an option (a policy, chunked prefill, `rows`: the cache's
    row pools, kvlab/engine/row_budget.py) must refuse it with a ValueError rather than ignore it.
    The engine core is its only caller; the LLM reads the attributes for `get_metrics`.
    """
    block_manager: object
    running: list            # admitted, unfinished sequences (len() is read)
    waiting: object          # queued sequences (len() and truthiness are read)
    num_preemptions: int

    def add(self, seq) -> None:
        """Queue a new request's sequence."""

    def schedule(self):
        """Plan the next step -> a `kvlab.engine.scheduler.Schedule` (items: ScheduledChunk(seq,
        start, num_tokens); freed_blocks). Planning is advancing: each item's
        `seq.num_computed_tokens` is its `end` on return, and its blocks are held."""

    def rollback(self, schedule) -> None:
        """The step's forward raised: its sequences go back to waiting, holding no blocks."""

    def finish(self, seq, reason: str) -> None:
        """seq is done (running or waiting): free its blocks, set its status and finish_reason."""

    def take_events(self) -> list[int]:
        """Block ids whose contents were dropped since the last call (the allocator's)."""

    def has_unfinished(self) -> bool:
        """Any sequence waiting or running?"""


@runtime_checkable
class EngineCoreLike(Protocol):
    """One step of the serving loop (kvlab/engine/core.py): schedule, run, sample, append, stop,
    finish. Built by `LLM(engine_core=factory)` as `factory(scheduler=, runner=, max_model_len=,
    eos_token_id=, tokenizer=, device=)`; `kvlab.LLM` is its only caller. The LLM reads
    `requests` (request_id -> unfinished Sequence) to refuse a request id in use, and exposes
    `scheduler`, `runner`, `metrics` (an EngineMetrics) and `eos_token_id` as its own attributes.
    """
    scheduler: object
    runner: object
    metrics: object
    eos_token_id: int | None
    requests: dict

    def add(self, seq) -> None:
        """Take a new request's sequence (the LLM has validated it)."""

    def abort(self, request_id: str) -> None:
        """Finish that request now (unknown ids are ignored); the next step() reports it."""

    def step(self) -> list:
        """Run one step -> a `kvlab.engine.core.StepOutput(seq, new_token_ids)` per sequence that
        produced a token or was aborted since the last step."""

    def has_unfinished(self) -> bool:
        """Anything left to run or to report?"""


ATTENTION_FUNCTIONS = ("reshape_and_cache", "paged_decode_attention", "paged_prefill_attention")
@runtime_checkable
class KVCacheLike(Protocol):
    """The whole paged KV cache (`kvlab.LLM(kv_cache=factory)`), built by
    `factory(num_layers=, num_blocks=, block_size=, num_kv_heads=, head_dim=, dtype=, device=,
    attention_backend=)` (PagedKVCache's parameters): the model calls `attend(layer, q, k, v)` with
    the packed step (q [1, N, Hq, D], k and v [1, N, Hkv, D]) and gets [1, N, Hq, D], then
    `advance(N)` (kvlab/cache/base.py); the runner
    opens and closes each step. `nbytes` must fit the engine's KV memory budget."""
    block_size: int
    num_blocks: int
    nbytes: int
    device: torch.device

    def attend(self, layer: int, q, k, v): ...

    def advance(self, num_tokens: int) -> None: ...

    def begin_step(self, metadata, freed_blocks=()) -> None: ...

    def end_step(self) -> None: ...


KV_CACHE_METHODS = ("attend", "advance", "begin_step", "end_step")
KV_CACHE_ATTRIBUTES = ("block_size", "num_blocks", "nbytes", "device")
SCHEDULER_METHODS = ("add", "schedule", "rollback", "finish", "take_events", "has_unfinished")
SCHEDULER_ATTRIBUTES = ("block_manager", "running", "waiting", "num_preemptions")
ENGINE_CORE_METHODS = ("add", "abort", "step", "has_unfinished")
ENGINE_CORE_ATTRIBUTES = ("scheduler", "runner", "metrics", "eos_token_id", "requests")


def check_protocol(obj, methods, what: str, argument: str, attributes=()) -> None:
    """ValueError naming the argument and the missing methods (and attributes), if obj lacks any."""
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    missing += [a for a in attributes if not hasattr(obj, a)]
    if missing:
        article = "an" if what[0] in "aeiou" else "a"
        raise ValueError(f"{argument}: {article} {what} needs {', '.join(missing)}; "
                         f"{type(obj).__name__} has not (see kvlab/engine/protocols.py)")


def check_factory(factory, what: str, argument: str) -> None:
    """ValueError unless factory is a class or another callable (checked before anything is built)."""
    if not callable(factory):
        raise ValueError(f"{argument} must be a class or a callable that builds a {what} "
                         f"(see kvlab/engine/protocols.py), got {type(factory).__name__}")


def build_part(factory, what: str, argument: str, methods, attributes, **kwargs):
    """factory(**kwargs), checked against its protocol (a ValueError naming the argument)."""
    check_factory(factory, what, argument)
    part = factory(**kwargs)
    check_protocol(part, methods, what, argument, attributes)
    return part


BLOCK_ALLOCATOR_METHODS = ("lookup", "can_allocate", "allocate", "can_append", "may_append",
                           "register_computed", "deallocate", "take_events", "usage")
KV_FORMAT_METHODS = ("storage", "write", "read")
