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
go away; the exercises' signatures do not change.
"""
from __future__ import annotations

import functools

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
    def like(cls, cache: PagedKVCache, attend) -> "PluggedPagedCache":
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
    llm.scheduler = scheduler


def install_block_manager(llm, block_manager) -> None:
    """Make `block_manager` the one `llm` and its scheduler use (an idle engine only)."""
    if llm.has_unfinished_requests():
        raise ValueError("install_block_manager needs an idle engine")
    llm.block_manager = block_manager
    llm.scheduler.block_manager = block_manager


def split_packed(x: torch.Tensor, query_start_loc: torch.Tensor) -> list[torch.Tensor]:
    """Rows of a packed tensor per sequence (a convenience for plugged functions)."""
    qsl = query_start_loc.tolist()
    return [x[qsl[s]:qsl[s + 1]] for s in range(len(qsl) - 1)]
