"""The paged KV cache: a pool of fixed-size blocks shared by every sequence in the batch.

Layout (docs/architecture.md, section 3): per layer, K and V pools of shape
[num_blocks, block_size, Hkv, D]. Token-major inside a block: one new token's K for all heads is
one contiguous write, and one head of one block is block_size rows of D contiguous numbers, the
tile a decode kernel loads. Which blocks belong to which sequence is not the cache's business; the
block manager hands out block ids and the engine passes them in, per step, as `AttentionMetadata`
(Kwon et al., 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention").

The engine runs the model on a *packed* batch, B = 1 and T = N = all new tokens of all scheduled
sequences, so this cache speaks the model's KV-cache protocol (kvlab/cache/base.py) unchanged:
`attend` writes the new K/V to their slots and returns attention over each sequence's context.
`sliding_windows` (one entry per layer, None = full attention) makes the backend attend a windowed
layer's queries over their last W cache indices only (`sliding_window=` of the entry points).

`kv_groups` (a `kvlab.engine.kv_groups.KVGroupLayout`, for a model that mixes layer types): one
block table per group over one pool of block ids. The cache then holds `num_slots` tensors (per K
and V), layer l using the one of its rank in its group, so `k_cache[l]` is that shared tensor; each
layer attends with its group's part of the metadata (`AttentionMetadata.groups`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvlab.attention import backend_module
from kvlab.cache.base import check_sliding_windows


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each sequence attends over (S sequences, N tokens)."""
    slot_mapping: torch.Tensor     # [N] int64: block * block_size + offset of each new token
    query_start_loc: torch.Tensor  # [S + 1] int32: sequence s owns new tokens qsl[s]:qsl[s+1]
    context_lens: torch.Tensor     # [S] int32: tokens in the cache for s after this step's write
    block_tables: torch.Tensor     # [S, max_blocks] int32, padded with -1
    is_decode: bool                # every sequence has exactly one new token
    # a per-sequence KV budget (kvlab/engine/kv_eviction.py, kvlab/cache/compaction.py)
    compactions: list = field(default_factory=list)     # cuts to copy before the forward
    score_rows: torch.Tensor | None = None              # [N] bool: queries whose attention is summed
    # several KV cache groups (kvlab/engine/kv_groups.py): group g's own slot_mapping, context_lens
    # and block_tables (its cache indices); the fields above are group 0's
    groups: list | None = None


def step_metadata(cache, q: torch.Tensor) -> AttentionMetadata:
    """The metadata of the step a paged cache is attending in, after checking the call's shape."""
    if cache.metadata is None:
        raise RuntimeError(f"{type(cache).__name__}.attend called before set_metadata()")
    if q.shape[0] != 1:
        raise ValueError(f"the paged cache runs packed batches (B = 1), got B = {q.shape[0]}")
    return cache.metadata


class PagedKVCache:
    """K/V block pools for every layer plus the per-step metadata the engine sets.

    PagedKVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                 dtype=torch.float32, device="cpu", attention_backend="torch",
                 sliding_windows=None, kv_groups=None)
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device="cpu",
                 attention_backend: str = "torch", sliding_windows=None, kv_groups=None):
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                            ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if value <= 0:
                raise ValueError(f"PagedKVCache: {name} must be positive, got {value}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.attention_backend = attention_backend
        self.ops = backend_module(attention_backend)
        self.sliding_windows = check_sliding_windows(sliding_windows, num_layers, "PagedKVCache")
        self.kv_groups = kv_groups
        self.num_kv_groups = 1 if kv_groups is None else kv_groups.num_groups
        slot = tuple(range(num_layers))
        if kv_groups is not None:
            if len(kv_groups.layer_group) != num_layers or any(
                    w != (None if self.sliding_windows is None else self.sliding_windows[layer])
                    for g, w in enumerate(kv_groups.windows) for layer in kv_groups.layers[g]):
                raise ValueError("PagedKVCache: kv_groups must group the layers by their sliding_windows")
            slot, self.layer_group = kv_groups.layer_slot, kv_groups.layer_group
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(max(slot) + 1)]
        v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(max(slot) + 1)]
        self.k_cache = [k[s] for s in slot]        # with groups, layers of different groups share
        self.v_cache = [v[s] for s in slot]
        self.scale = 1.0 / math.sqrt(head_dim)
        self.metadata: AttentionMetadata | None = None
        self.compactor = None      # a KV budget's KVCompactor (kvlab.LLM sets it), else None

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype = torch.float32) -> int:
        """Bytes one block id costs across all layers, K and V: what sizes the pool."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    def begin_step(self, metadata: AttentionMetadata | None, freed_blocks=()) -> None:
        """Called by the engine's runner before each forward pass (nothing is kept per block here,
        so the freed blocks need nothing); a KV budget's cuts are copied first."""
        if metadata is not None and metadata.compactions:
            self.compactor.compact(self, metadata.compactions)
        self.metadata = metadata

    def end_step(self) -> None:
        """Called after each forward pass, also when it raised."""
        self.metadata = None

    def set_metadata(self, metadata: AttentionMetadata) -> None:
        """begin_step(metadata) without freed blocks (tests and chapters driving the cache by hand)."""
        self.begin_step(metadata)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this cache holds (with a KV budget's scores)."""
        scores = self.compactor.nbytes if self.compactor is not None else 0
        tensors = {id(t): t for t in (*self.k_cache, *self.v_cache)}.values()     # shared ones once
        return sum(t.numel() * t.element_size() for t in tensors) + scores

    # ---- a per-sequence KV budget (kvlab/cache/compaction.py) -------------------------------
    def slot_views(self, layer: int) -> list[torch.Tensor]:
        """The layer's per-slot tensors, [num_blocks * block_size, Hkv, ...]: what a cut moves."""
        return [t[layer].view(-1, *t[layer].shape[2:]) for t in (self.k_cache, self.v_cache)]

    def context_keys(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """Keys of the given blocks, in order, [len(blocks) * block_size, Hkv, D]."""
        return self.k_cache[layer].index_select(0, blocks).flatten(0, 1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, N, Hq, D], k and v [1, N, Hkv, D] (packed batch) -> [1, N, Hq, D]."""
        m = step_metadata(self, q)
        if m.groups is not None:
            m = m.groups[self.layer_group[layer]]
        q, k, v = q[0], k[0], v[0]
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        self.ops.reshape_and_cache(k, v, kc, vc, m.slot_mapping)
        window = None if self.sliding_windows is None else self.sliding_windows[layer]
        kw = {} if window is None else {"sliding_window": window}   # a backend without it still works
        if m.is_decode:
            out = self.ops.paged_decode_attention(q, kc, vc, m.block_tables, m.context_lens, self.scale, **kw)
        else:
            out = self.ops.paged_prefill_attention(q, kc, vc, m.block_tables, m.query_start_loc,
                                                   m.context_lens, self.scale, **kw)
        if self.compactor is not None:
            self.compactor.observe(self, layer, q, m)
        return out.unsqueeze(0)

    def advance(self, num_tokens: int) -> None:
        """Nothing to move: positions live in the metadata, which the engine replaces each step."""
