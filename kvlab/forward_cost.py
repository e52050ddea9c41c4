"""What one forward pass of a decoder costs: FLOPs, bytes moved, and the roofline time floor.

A forward pass over `new_tokens` tokens per sequence, for `batch` sequences that already hold
`context` tokens in their KV cache, does:

- **weight matmuls**: 2 FLOPs (a multiply and an add) per weight per token, for every weight a token
  passes through. The input embedding is a table lookup, not a matmul; the output projection
  (vocab x hidden) runs only on the `logit_rows` positions whose logits are wanted (one per
  sequence when generating).
- **attention**: per layer, query head and new token that sees k keys, q.k^T and the weighted sum
  of values each take 2 x head_dim x k FLOPs, so 4 x head_dim x k in all. Token i of the new ones
  sees min(context + i + 1, window) keys (causal mask, sliding window where the layer has one).

and, at least, moves:

- every weight once (batch and tokens share one read),
- the cached keys and values of the past each layer attends over, once per sequence (the keys of
  the pass's own tokens are counted as written, not read back),
- the new keys and values written into the cache.

Activations are assumed to stay on chip (they do not for long prefills), so `bytes` is a lower
bound and `intensity = flops / bytes` an upper bound. `floor_seconds` is the roofline lower bound
max(flops / peak, bytes / bandwidth) (Williams et al., 2009, "Roofline"): no implementation on
that machine can be faster. Prefill (new_tokens = the prompt) has an intensity of about
2 x new_tokens x batch / weight_dtype_bytes, compute-bound for any real prompt; a decode step
(new_tokens = 1) about 2 x batch / weight_dtype_bytes, bandwidth-bound until the batch is large.

The weight split uses `vocab_size` and `tie_embeddings` of a `kvlab.memory.KVConfig` (or a
`LlamaConfig`, converted); with vocab_size unknown (0) every weight counts as a matmul weight read
and used by every token, which overcounts by the embedding table. The normalization weights (one
vector per norm) are counted as matmul weights too, 2 FLOPs per weight per token, an overcount of
0.03 % for SmolLM2; `kvlab.flops` counts the matmuls alone (`tests/test_flops.py` checks the two
differ by exactly that). For a mixture of experts,
`active_params` (the weights one token passes through) replaces num_params for FLOPs and for the
bytes of a batch-1 step; a larger batch reads more experts, which this lower bound leaves out.
Multi-head latent attention is counted as if it attended with num_heads x head_dim (an estimate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from kvlab.memory import as_kv_config, kv_bytes_per_token


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
        """Roofline lower bound on the time of this pass on `machine` (a `kvlab.roofline.Machine`)."""
        return max(self.flops / machine.peak_flops, self.bytes / machine.bandwidth)

    def __add__(self, other: ForwardCost) -> ForwardCost:
        return ForwardCost(self.flops + other.flops, self.weight_bytes + other.weight_bytes,
                           self.kv_read_bytes + other.kv_read_bytes,
                           self.kv_write_bytes + other.kv_write_bytes)


def weight_split(config) -> tuple[float, float]:
    """(body, head): weights every token multiplies by, and the output projection's vocab x hidden.

    body excludes the input embedding table (a lookup) and, when tied, the shared matrix, which
    is counted once, as the head.
    """
    cfg = as_kv_config(config)
    params = cfg.num_params if cfg.active_params is None else cfg.active_params
    head = cfg.vocab_size * cfg.hidden_size
    if head == 0:
        return float(params), 0.0
    embedding_tables = 1 if cfg.tie_embeddings else 2
    body = params - embedding_tables * head
    if body <= 0:
        raise ValueError(f"{cfg.name}: num_params ({params}) leaves no weights besides the embeddings "
                         f"({embedding_tables} x vocab_size x hidden_size = {embedding_tables * head})")
    return float(body), float(head)


def _keys_seen(new_tokens: int, context: int, window: int | None) -> int:
    """Sum over the new tokens of how many keys each attends to: min(context + i + 1, window)."""
    n, c = new_tokens, context
    total = n * c + n * (n + 1) // 2           # no window: (c + 1) + (c + 2) + ... + (c + n)
    if window is None or c + n <= window:
        return total
    # tokens whose full prefix exceeds the window see exactly `window` keys
    first_capped = max(0, window - c)           # tokens i < first_capped see c + i + 1 <= window keys
    m = first_capped
    return m * c + m * (m + 1) // 2 + (n - m) * window


def forward_cost(config, new_tokens: int, context: int = 0, batch: int = 1, *,
                 weight_dtype_bytes: float = 2, kv_dtype_bytes: float = 2,
                 logit_rows: int | None = None, use_cache: bool = True) -> ForwardCost:
    """FLOPs and minimum bytes of one forward pass (see the module docstring for what is counted).

    new_tokens: tokens per sequence in this pass (the prompt for prefill, 1 for a decode step).
    context: tokens already in each sequence's cache. logit_rows: positions that go through the
    output projection (default: one per sequence, as in generation). use_cache=False: no cache
    is read or written (context must be 0; the pass's own keys stay on chip, a lower bound).
    """
    if new_tokens < 1 or batch < 1:
        raise ValueError(f"new_tokens and batch must be >= 1, got new_tokens={new_tokens}, batch={batch}")
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if not use_cache and context:
        raise ValueError(f"use_cache=False recomputes everything: context must be 0, got {context}")
    cfg = as_kv_config(config)
    rows = batch if logit_rows is None else logit_rows
    if not 0 <= rows <= batch * new_tokens:
        raise ValueError(f"logit_rows must be in [0, batch x new_tokens = {batch * new_tokens}], got {rows}")
    body, head = weight_split(cfg)
    flops = 2 * body * new_tokens * batch + 2 * head * rows
    full_layers = cfg.num_layers - cfg.sliding_layers
    keys = full_layers * _keys_seen(new_tokens, context, None)
    held = full_layers * context
    if cfg.sliding_layers:
        keys += cfg.sliding_layers * _keys_seen(new_tokens, context, cfg.sliding_window)
        held += cfg.sliding_layers * min(context, cfg.sliding_window)
    flops += 4 * cfg.num_heads * cfg.head_dim * keys * batch
    per_layer_token = kv_bytes_per_token(cfg, kv_dtype_bytes) / cfg.num_layers if use_cache else 0.0
    return ForwardCost(
        flops=float(flops),
        weight_bytes=(body + head) * weight_dtype_bytes,
        kv_read_bytes=per_layer_token * held * batch,
        kv_write_bytes=per_layer_token * cfg.num_layers * new_tokens * batch,
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
