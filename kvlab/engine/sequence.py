"""One request as the engine sees it: its tokens, its block table and where it is in its life.

A sequence is WAITING (queued, holds no blocks), RUNNING (holds blocks, is prefilled or decoded
each step) or FINISHED. Preemption by recompute sends a RUNNING sequence back to WAITING with its
blocks freed; when it is admitted again, prompt *and* already generated tokens are prefilled in one
pass, which rebuilds exactly the K/V it lost (Kwon et al., 2023, section 4.5).

`num_computed_tokens` counts the tokens whose K/V are in the cache, or are being computed by the
step the scheduler has just planned: the scheduler alone advances it, when it plans a step
(kvlab/engine/scheduler.py, `Schedule`), and puts it back if that step's forward fails. A step
computes the whole prompt at admission (less what the prefix cache already holds,
`num_cached_tokens`), or, with chunked prefill, the prompt in chunks over several steps; then one
token per decode step.

Who writes what: the scheduler writes `status`, `num_computed_tokens`, `num_preemptions` and,
with a KV budget, the eviction counters (through its `Evictor`); the block manager writes
`block_table` (and `kv_group_tables`) and `num_cached_tokens`; the engine core (kvlab/engine/core.py)
writes the tokens, `finish_reason`, `text` and the times. Nobody else writes a sequence.
"""
from __future__ import annotations

import itertools
import time
from enum import Enum, auto

from kvlab.engine.sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    _ids = itertools.count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams | None = None,
                 request_id: str | None = None, prompt: str | None = None,
                 cache_salt: str | None = None, arrival_time: float | None = None):
        self.seq_id = next(Sequence._ids)
        self.request_id = str(self.seq_id) if request_id is None else request_id
        self.prompt = prompt
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling_params = sampling_params or SamplingParams()
        self.cache_salt = cache_salt
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # a model with several KV cache groups (kvlab/engine/kv_groups.py): one table per group,
        # the first being block_table itself; written by the block manager, like block_table
        self.kv_group_tables: list[list[int]] = []
        self.num_cached_tokens = 0      # prefix-cache hits at admission (set by the block manager)
        self.num_computed_tokens = 0    # tokens whose K/V are in the cache (or in the planned step)
        self.finish_reason: str | None = None
        self.text = ""                  # completion text, set when a stop string ends it
        self.stopped_by_string = False
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.num_preemptions = 0
        # KV eviction (kvlab/engine/kv_eviction.py): entries dropped from the cache, so position p
        # sits at cache index p - num_evicted_tokens; leading entries no cut may drop; snapkv's
        # one-time selection made
        self.num_evicted_tokens = 0
        self.num_pinned_entries = 0
        self.kv_snapped = False

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, status={self.status.name}, len={len(self)}, "
                f"blocks={self.block_table})")

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))
