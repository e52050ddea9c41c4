"""What one forward pass of a decoder costs: FLOPs, bytes moved, and the roofline time floor.

A forward pass over `new_tokens` tokens per sequence, for `batch` sequences that already hold
`context` tokens in their KV cache, does the FLOPs `kvlab.costs.flops.forward_flops` counts (matmuls only:
2 per weight per token, attention over the keys the causal mask and any sliding window allow, the
output projection on `logit_rows` positions; norm weights, softmax and the like not counted) and,
at least, moves:

- every weight once (batch and tokens share one read), the norm vectors included, except the
  input embedding table, of which a lookup reads only a few rows (counted as none),
- the cached keys and values of the past each layer attends over, once per sequence (the keys of
  the pass's own tokens are counted as written, not read back),
- the new keys and values written into the cache.

Activations are assumed to stay on chip (they do not for long prefills), so `bytes` is a lower
bound and `intensity = flops / bytes` an upper bound. `floor_seconds` is the roofline lower bound
max(flops / peak, bytes / bandwidth) (Williams et al., 2009, "Roofline"): no implementation on
that machine can be faster. Prefill (new_tokens = the prompt) has an intensity of about
2 x new_tokens x batch / weight_dtype_bytes, compute-bound for any real prompt; a decode step
(new_tokens = 1) about 2 x batch / weight_dtype_bytes, bandwidth-bound until the batch is large.

Configurations: a `kvlab.costs.memory.KVConfig` (the `MODELS` table: sliding windows, tied or untied
embeddings, mixtures of experts) or a `kvlab.model.config.LlamaConfig`, as in `kvlab.costs.flops`. For a
mixture of experts the weight bytes are those of the active weights, right for a batch-1 step; a
larger batch reads more experts, which this lower bound leaves out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from kvlab.costs.flops import forward_flops, norm_weights, weight_split
from kvlab.costs.memory import as_kv_config, kv_bytes_per_token, kv_cache_bytes


@dataclass(frozen=True)
class ForwardCost:
    flops: float
    weight_bytes: float
    kv_read_bytes: float
    kv_write_bytes: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved (an upper bound: activation traffic is not counted)."""
        return self.flops / self.bytes

    def floor_seconds(self, machine) -> float:
        """Roofline lower bound on the time of this pass on `machine` (a `kvlab.costs.roofline.Machine`)."""
        return max(self.flops / machine.peak_flops, self.bytes / machine.bandwidth)

    def __add__(self, other: ForwardCost) -> ForwardCost:
        return ForwardCost(self.flops + other.flops, self.weight_bytes + other.weight_bytes,
                           self.kv_read_bytes + other.kv_read_bytes,
                           self.kv_write_bytes + other.kv_write_bytes)


def forward_cost(config, new_tokens: int, context: int = 0, batch: int = 1, *,
                 weight_dtype_bytes: float = 2, kv_dtype_bytes: float = 2,
                 logit_rows: int | None = None, use_cache: bool = True) -> ForwardCost:
    """FLOPs and minimum bytes of one forward pass (see the module docstring for what is counted).

    new_tokens: tokens per sequence in this pass (the prompt for prefill, 1 for a decode step).
    context: tokens already in each sequence's cache. logit_rows: positions that go through the
    output projection (default: one per sequence, as in generation). use_cache=False: no cache
    is read or written (context must be 0; the pass's own keys stay on chip, a lower bound).
    """
    if not use_cache and context:
        raise ValueError(f"use_cache=False recomputes everything: context must be 0, got {context}")
    cfg = as_kv_config(config)
    flops = forward_flops(cfg, new_tokens, context, batch, logit_rows)   # checks the counts
    body, head = weight_split(cfg)
    per_token = kv_bytes_per_token(cfg, kv_dtype_bytes) if use_cache else 0
    return ForwardCost(
        flops=float(flops.total),
        weight_bytes=(body + norm_weights(cfg) + head) * weight_dtype_bytes,
        kv_read_bytes=kv_cache_bytes(cfg, context, batch, kv_dtype_bytes) if use_cache else 0.0,
        kv_write_bytes=per_token * new_tokens * batch,
    )


def generation_cost(config, prompt_tokens: int, new_tokens: int, *, use_cache: bool = True,
                    batch: int = 1, **kwargs) -> list[ForwardCost]:
    """One `ForwardCost` per generated token: prefill then decode steps, or (use_cache=False) one
    full pass over the whole prefix per token, as the naive loop does."""
    if prompt_tokens < 1 or new_tokens < 1:
        raise ValueError(f"prompt_tokens and new_tokens must be >= 1, got {prompt_tokens}, {new_tokens}")
    if use_cache:
        return [forward_cost(config, prompt_tokens, 0, batch, **kwargs)] + [
            forward_cost(config, 1, prompt_tokens + t - 1, batch, **kwargs) for t in range(1, new_tokens)]
    return [forward_cost(config, prompt_tokens + t, 0, batch, use_cache=False, **kwargs)
            for t in range(new_tokens)]


def critical_batch(machine, weight_dtype_bytes: float = 2) -> int:
    """Smallest batch at which a decode step's weight matmuls reach `machine`'s ridge point.

    A decode step of batch B does 2 B FLOPs per weight and reads each weight once
    (weight_dtype_bytes), so its intensity is about 2 B / weight_dtype_bytes. Below this batch the
    step is bandwidth-bound and a larger batch comes almost free; above it, compute-bound.
    KV reads (which grow with B x context) push the real crossover further right.
    """
    if not weight_dtype_bytes > 0:
        raise ValueError(f"weight_dtype_bytes must be positive, got {weight_dtype_bytes}")
    return max(1, math.ceil(machine.ridge * weight_dtype_bytes / 2))
