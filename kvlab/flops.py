"""Analytic FLOP counts of a Llama-family forward pass, from its configuration alone.

One multiply-add is 2 FLOPs. A forward pass over T new tokens, with P earlier tokens whose keys and
values are already cached (P = 0 without a cache), costs:

- **linear layers**: every weight matrix multiplies every new token once, 2 FLOPs per weight per
  token. Per layer the weights are q, k, v, o (h x Hq D, 2 x h x Hkv D, Hq D x h) and the SwiGLU MLP
  (3 x h x I). So the layers cost 2 N T, with N the non-embedding weights: the "2N FLOPs per token"
  of Kaplan et al., 2020, "Scaling Laws for Neural Language Models".
- **attention**: new query i sits at position P + i and sees P + i + 1 keys. Scores q.k and the
  weighted sum of values cost 2 D FLOPs per query head and key each, so 4 Hq D (P + i + 1) per
  layer, and 4 L Hq D (T P + T (T + 1) / 2) over the pass. Only the keys the causal mask allows are
  counted (a kernel that also multiplies the masked half does more work, not more useful work).
- **the output projection** (`lm_head`, h x vocab): 2 h V per row of logits asked for. kvlab's
  generation asks for one row per step (`last_only=True`).

Left out, because they grow only linearly with T and are small: embedding lookup, RMSNorm, RoPE,
softmax, SiLU, residual additions. Kaplan et al. give 2 n_layer n_ctx d_attn FLOPs per token for the
context-dependent part; here the scores and the weighted sum of values are each counted, 2 D FLOPs
per key and query head apiece, so 4 L Hq D per (query, key) pair. Pope et al., 2022, "Efficiently
Scaling Transformer Inference" split the cost of inference the same way, into weight FLOPs and
attention FLOPs.

Without a cache, step t of a generation runs a forward over all n = prompt + t tokens; with one,
step 0 runs the prompt (prefill) and later steps run one token against n - 1 cached ones (decode).
Summed over steps the first grows like n^2 (n^3 for the attention part), the second like n (n^2).
"""
from __future__ import annotations

from dataclasses import dataclass

_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
           "vocab_size")


@dataclass(frozen=True)
class Flops:
    """FLOPs of one forward pass (or a sum of them), split by where they are spent."""
    linear: int      # q, k, v, o projections and the MLP of every layer
    attention: int   # q.k scores and the weighted sum of values, causal keys only
    lm_head: int     # logits

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.lm_head

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.linear + other.linear, self.attention + other.attention,
                     self.lm_head + other.lm_head)


def _check_config(config) -> None:
    for name in _FIELDS:
        val = getattr(config, name, None)
        if not isinstance(val, int) or val <= 0:
            raise ValueError(f"config.{name} must be a positive integer, got {val!r} "
                             "(pass a kvlab.model.config.LlamaConfig or a model's .config)")


def _check_count(name: str, value, minimum: int) -> None:
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def linear_weights(config) -> int:
    """Non-embedding weights of the matmuls of all layers: L (2 h Hq D + 2 h Hkv D + 3 h I)."""
    _check_config(config)
    h, d = config.hidden_size, config.head_dim
    per_layer = 2 * h * config.num_heads * d + 2 * h * config.num_kv_heads * d
    per_layer += 3 * h * config.intermediate_size
    return config.num_layers * per_layer


def linear_flops_per_token(config) -> int:
    """2 x `linear_weights`: the FLOPs every token costs in the layers' matmuls, whatever its position."""
    return 2 * linear_weights(config)


def lm_head_flops(config, rows: int = 1) -> int:
    """2 h V FLOPs per row of logits."""
    _check_config(config)
    _check_count("rows", rows, 0)
    return 2 * config.hidden_size * config.vocab_size * rows


def attention_flops(config, new_tokens: int, past_tokens: int = 0) -> int:
    """4 L Hq D (T P + T (T + 1) / 2): causal attention of T new queries after P cached keys."""
    _check_config(config)
    _check_count("new_tokens", new_tokens, 0)
    _check_count("past_tokens", past_tokens, 0)
    T, P = int(new_tokens), int(past_tokens)
    keys_seen = T * P + T * (T + 1) // 2  # sum over new queries of the keys each one sees
    return 4 * config.num_layers * config.num_heads * config.head_dim * keys_seen


def forward_flops(config, new_tokens: int, past_tokens: int = 0, logit_rows: int = 1) -> Flops:
    """FLOPs of one forward pass over `new_tokens` after `past_tokens` cached ones."""
    _check_count("new_tokens", new_tokens, 0)
    return Flops(linear=linear_flops_per_token(config) * int(new_tokens),
                 attention=attention_flops(config, new_tokens, past_tokens),
                 lm_head=lm_head_flops(config, logit_rows))


def step_flops(config, prompt_len: int, step: int, use_cache: bool) -> Flops:
    """FLOPs of generation step `step` (0 = the first new token) after a prompt of `prompt_len`.

    No cache: a forward over prompt_len + step tokens. Cache: step 0 is the prefill of the prompt,
    step t > 0 one token after prompt_len + t - 1 cached ones. One row of logits either way.
    """
    _check_count("prompt_len", prompt_len, 1)
    _check_count("step", step, 0)
    n = int(prompt_len) + int(step)
    if not use_cache:
        return forward_flops(config, n, 0)
    if step == 0:
        return forward_flops(config, prompt_len, 0)
    return forward_flops(config, 1, n - 1)


def generation_flops(config, prompt_len: int, new_tokens: int, use_cache: bool) -> Flops:
    """Total FLOPs of generating `new_tokens` tokens (the sum of `step_flops`, in closed form)."""
    _check_config(config)
    _check_count("prompt_len", prompt_len, 1)
    _check_count("new_tokens", new_tokens, 0)
    P, N = int(prompt_len), int(new_tokens)
    if N == 0:
        return Flops(0, 0, 0)
    c = 4 * config.num_layers * config.num_heads * config.head_dim
    if use_cache:
        # prefill: P tokens; decode step t = 1..N-1: one token seeing P + t keys
        tokens = P + (N - 1)
        keys_seen = P * (P + 1) // 2 + sum_range(P + 1, P + N - 1)
    else:
        # step t = 0..N-1: P + t tokens from scratch
        tokens = sum_range(P, P + N - 1)
        keys_seen = _tetrahedral(P + N - 1) - _tetrahedral(P - 1)  # sum of n (n + 1) / 2, n = P..P+N-1
    return Flops(linear=linear_flops_per_token(config) * tokens, attention=c * keys_seen,
                 lm_head=lm_head_flops(config, N))


def _tetrahedral(m: int) -> int:
    """1 + 3 + 6 + ... + m (m + 1) / 2 = m (m + 1) (m + 2) / 6."""
    return m * (m + 1) * (m + 2) // 6


def sum_range(a: int, b: int) -> int:
    """a + (a + 1) + ... + b (0 if b < a)."""
    return 0 if b < a else (a + b) * (b - a + 1) // 2
