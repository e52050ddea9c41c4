"""The four seams of the engine: what an object must have to be plugged into `kvlab.LLM`.

Each seam is a constructor argument that takes a name (kvlab's own implementation) or an object
following the protocol below; nothing needs to inherit from a kvlab class. docs/architecture.md
("Seams") shows the smallest object satisfying each one.

    kvlab.LLM(scheduling_policy="fcfs" | callable,
              prefix_cache="hash" | "radix" | "none" | BlockAllocator object,
              kv_cache_dtype="auto" | "int8" | "fp8" | "int4" | "int2" | KVFormat object,
              attention_backend="torch" | "cpu" | "triton" | AttentionBackend object)

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


ATTENTION_FUNCTIONS = ("reshape_and_cache", "paged_decode_attention", "paged_prefill_attention")


def check_protocol(obj, methods, what: str, argument: str) -> None:
    """ValueError naming the argument and the missing methods, if obj lacks any of them."""
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        raise ValueError(f"{argument}: a {what} needs {', '.join(missing)}; "
                         f"{type(obj).__name__} has not (see kvlab/engine/protocols.py)")


BLOCK_ALLOCATOR_METHODS = ("lookup", "can_allocate", "allocate", "can_append", "may_append",
                           "register_computed", "deallocate", "take_events", "usage")
KV_FORMAT_METHODS = ("storage", "write", "read")
