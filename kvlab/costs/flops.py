"""Analytic FLOP counts of a decoder's forward pass, from its configuration alone.

Convention: one multiply-add is 2 FLOPs, and only matrix products are counted. A forward pass over
T new tokens per sequence, for B sequences that already hold C tokens each in their KV cache
(C = 0 without a cache), costs:

- **linear layers**: every matmul weight multiplies every new token once, 2 FLOPs per weight per
  token. In a Llama layer these are q, k, v, o (h x Hq D, 2 x h x Hkv D, Hq D x h) and the SwiGLU
  MLP (3 x h x I). So the layers cost 2 W T B, with W the matmul weights: the "2N FLOPs per token"
  of Kaplan et al., 2020, "Scaling Laws for Neural Language Models", N the non-embedding weights.
- **attention**: new token i sits at position C + i and sees min(C + i + 1, window) keys (causal
  mask; a sliding window where the layer has one). The scores q.k and the weighted sum of values
  cost 2 D FLOPs per query head and key each, so 4 Hq D per (query, key) pair and layer. Only the
  keys the mask allows are counted (a kernel that also multiplies the masked part does more work,
  not more useful work).
- **the output projection** (`lm_head`, h x V): 2 h V per row of logits asked for; generation asks
  for one row per sequence (`last_only=True`).

Not counted, because they are not matmuls and grow only linearly with T: the embedding lookup, the
RMSNorm weights (one vector of h per norm, scaling, not multiplying a matrix), RoPE, softmax, SiLU,
residual additions. The linear and lm_head counts equal what torch's `FlopCounterMode` reports for
`kvlab.model.Llama` (`tests/test_flops.py`). Kaplan et al. give 2 n_layer n_ctx d_attn FLOPs per
token for the context-dependent part; here the scores and the weighted sum of values are each
counted, so 4 L Hq D per (query, key) pair. Pope et al., 2022, "Efficiently Scaling Transformer
Inference" split inference cost the same way, into weight FLOPs and attention FLOPs.

The weights come from the parameter total (`weight_split`): a `kvlab.model.config.LlamaConfig` gives
it exactly; a `kvlab.costs.memory.KVConfig` (the `MODELS` table) gives a published total, from which the
embedding table(s) and the norm vectors (Llama layout, 2 per layer + 1) are taken off. With
vocab_size unknown (0) the embedding stays in, an overcount. For a mixture of experts
`active_params` (the weights one token passes through) replaces num_params. Multi-head latent
attention is counted as if it attended with num_heads x head_dim (an estimate).

Without a cache, step t of a generation runs a forward over all n = prompt + t tokens; with one,
step 0 runs the prompt (prefill) and later steps run one token against n - 1 cached ones (decode).
Summed over steps the first grows like n^2 (n^3 for the attention part), the second like n (n^2).
"""
from __future__ import annotations

from dataclasses import dataclass

from kvlab.costs.memory import as_kv_config


@dataclass(frozen=True)
class Flops:
    """FLOPs of one forward pass (or a sum of them), split by where they are spent."""
    linear: float     # q, k, v, o projections and the MLP of every layer
    attention: float  # q.k scores and the weighted sum of values, allowed keys only
    lm_head: float    # logits

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.lm_head

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.linear + other.linear, self.attention + other.attention,
                     self.lm_head + other.lm_head)


def _check_count(name: str, value, minimum: int) -> int:
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def norm_weights(config) -> int:
    """RMSNorm weights, Llama layout: h before attention and h before the MLP in every layer, h at the end."""
    cfg = as_kv_config(config)
    return cfg.hidden_size * (2 * cfg.num_layers + 1)


def weight_split(config) -> tuple[float, float]:
    """(body, head): the matmul weights every new token multiplies, and the output projection's V x h.

    body = parameters (active ones for a mixture of experts) - embedding table(s) - norm weights. The
    input embedding is a lookup; tied, the shared matrix is counted once, as the head. For a
    LlamaConfig, body is exactly L (2 h Hq D + 2 h Hkv D + 3 h I).
    """
    cfg = as_kv_config(config)
    params = cfg.num_params if cfg.active_params is None else cfg.active_params
    head = cfg.vocab_size * cfg.hidden_size
    tables = 0 if head == 0 else 1 if cfg.tie_embeddings else 2
    body = params - tables * head - norm_weights(cfg)
    if body <= 0:
        raise ValueError(f"{cfg.name}: num_params ({params}) leaves no matmul weights besides the embeddings "
                         f"({tables} x vocab_size x hidden_size = {tables * head}) and the norms "
                         f"({norm_weights(cfg)})")
    return body, head


def linear_flops_per_token(config) -> float:
    """2 x body of `weight_split`: the FLOPs every token costs in the layers' matmuls, whatever its position."""
    return 2 * weight_split(config)[0]


def lm_head_flops(config, rows: int = 1) -> float:
    """2 h V FLOPs per row of logits."""
    return 2 * weight_split(config)[1] * _check_count("rows", rows, 0)


def keys_seen(new_tokens: int, context: int = 0, window: int | None = None) -> int:
    """Sum over the new tokens i = 0 .. T-1 of the keys each attends to: min(context + i + 1, window)."""
    n, c = new_tokens, context
    if window is None or c + n <= window:
        return n * c + n * (n + 1) // 2        # (c + 1) + (c + 2) + ... + (c + n)
    m = max(0, window - c)                     # tokens i < m see c + i + 1 <= window keys, the rest `window`
    return m * c + m * (m + 1) // 2 + (n - m) * window


def _over_layers(cfg, keys_of) -> int:
    """4 Hq D x the keys of every layer, keys_of(window) giving one layer's (window None = full attention)."""
    keys = (cfg.num_layers - cfg.sliding_layers) * keys_of(None)
    if cfg.sliding_layers:
        keys += cfg.sliding_layers * keys_of(cfg.sliding_window)
    return 4 * cfg.num_heads * cfg.head_dim * keys


def attention_flops(config, new_tokens: int, context: int = 0) -> int:
    """Attention of `new_tokens` queries after `context` cached keys, one sequence:
    4 L Hq D (T C + T (T + 1) / 2) without sliding windows."""
    cfg = as_kv_config(config)
    n, c = _check_count("new_tokens", new_tokens, 0), _check_count("context", context, 0)
    return _over_layers(cfg, lambda w: keys_seen(n, c, w))


def forward_flops(config, new_tokens: int, context: int = 0, batch: int = 1,
                  logit_rows: int | None = None) -> Flops:
    """FLOPs of one forward pass over `new_tokens` tokens per sequence after `context` cached ones, for
    `batch` sequences; `logit_rows` rows of logits (default: one per sequence)."""
    n = _check_count("new_tokens", new_tokens, 1)
    b = _check_count("batch", batch, 1)
    rows = b if logit_rows is None else logit_rows
    if not 0 <= rows <= b * n:
        raise ValueError(f"logit_rows must be in [0, batch x new_tokens = {b * n}], got {rows}")
    return Flops(linear=linear_flops_per_token(config) * n * b,
                 attention=attention_flops(config, n, context) * b,
                 lm_head=lm_head_flops(config, rows))


def step_flops(config, prompt_len: int, step: int, use_cache: bool) -> Flops:
    """FLOPs of generation step `step` (0 = the first new token) after a prompt of `prompt_len`.

    No cache: a forward over prompt_len + step tokens. Cache: step 0 is the prefill of the prompt,
    step t > 0 one token after prompt_len + t - 1 cached ones. One row of logits either way.
    """
    n = _check_count("prompt_len", prompt_len, 1) + _check_count("step", step, 0)
    if not use_cache:
        return forward_flops(config, n)
    if step == 0:
        return forward_flops(config, prompt_len)
    return forward_flops(config, 1, n - 1)


def generation_flops(config, prompt_len: int, new_tokens: int, use_cache: bool) -> Flops:
    """Total FLOPs of generating `new_tokens` tokens (the sum of `step_flops`, in closed form)."""
    cfg = as_kv_config(config)
    P, N = _check_count("prompt_len", prompt_len, 1), _check_count("new_tokens", new_tokens, 0)
    if N == 0:
        return Flops(0, 0, 0)
    last = P + N - 1
    if use_cache:
        # prefill: P tokens; decode step t = 1..N-1: one token seeing min(P + t, w) keys
        tokens = P + (N - 1)
        attention = _over_layers(cfg, lambda w: keys_seen(P, 0, w) + _sum_capped(P + 1, last, w))
    else:
        # step t = 0..N-1: a forward over n = P + t tokens from scratch
        tokens = sum_range(P, last)
        attention = _over_layers(cfg, lambda w: _sum_prefill_keys(P, last, w))
    return Flops(linear=linear_flops_per_token(cfg) * tokens, attention=attention,
                 lm_head=lm_head_flops(cfg, N))


def _sum_capped(a: int, b: int, w: int | None) -> int:
    """min(a, w) + min(a + 1, w) + ... + min(b, w)."""
    if w is None:
        return sum_range(a, b)
    return sum_range(a, min(b, w)) + w * max(0, b - max(a, w + 1) + 1)


def _sum_prefill_keys(a: int, b: int, w: int | None) -> int:
    """keys_seen(n, 0, w) summed over n = a..b: n (n + 1) / 2 up to n = w, then w (w + 1) / 2 + (n - w) w."""
    if w is None:
        return _tetrahedral(b) - _tetrahedral(a - 1)
    total = _tetrahedral(min(b, w)) - _tetrahedral(a - 1) if a <= w else 0
    lo = max(a, w + 1)
    if lo <= b:
        count = b - lo + 1
        total += count * w * (w + 1) // 2 + w * (sum_range(lo, b) - count * w)
    return total


def _tetrahedral(m: int) -> int:
    """1 + 3 + 6 + ... + m (m + 1) / 2 = m (m + 1) (m + 2) / 6."""
    return m * (m + 1) * (m + 2) // 6


def sum_range(a: int, b: int) -> int:
    """a + (a + 1) + ... + b (0 if b < a)."""
    return 0 if b < a else (a + b) * (b - a + 1) // 2
