"""Autoregressive generation: with no cache (recompute the prefix every step) or a contiguous cache.

Without a cache, step t runs the model over all `prompt + t` tokens to get one new token, so the
work of a whole generation grows with the square of its length. With a cache, the first forward
pass (prefill) runs over the prompt once and stores every layer's keys and values; each later step
(decode) runs the model on the one new token and attends over the stored past. The two give the
same logits up to float rounding; `tests/test_generate.py` checks it on the real model.

`iter_generate` yields one `Step(token, logits)` at a time (notebooks time each step);
`generate` returns the list of new tokens; `generate_batch` decodes several prompts together.

Sampling: temperature 0 is greedy (argmax). Otherwise logits are divided by the temperature, then
optionally cut to the `top_k` most likely tokens (Fan et al., 2018, "Hierarchical Neural Story
Generation") and to the smallest set whose probability reaches `top_p` (Holtzman et al., 2020,
"The Curious Case of Neural Text Degeneration"), and one token is drawn with a `torch.Generator`
seeded by `seed`, so a seeded run is reproducible.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from kvlab.cache.contiguous import ConcatKVCache, ContiguousKVCache
from kvlab.engine.sampling import filter_logits

CACHE_KINDS = ("prealloc", "concat")


@dataclass
class Step:
    token: int | list[int]   # the new token (a list, one per row, in batched generation)
    logits: torch.Tensor     # float32 logits it was chosen from: [vocab], or [batch, vocab]


def _check_sampling(temperature, top_k, top_p, vocab_size):
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError("top_k and top_p need temperature > 0 (temperature=0 is greedy decoding)")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row from logits [B, V] -> [B] int64."""
    _check_sampling(temperature, top_k, top_p, logits.shape[-1])
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits, temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_common(model, prompt_lens, max_new_tokens, use_cache, cache, temperature, top_k, top_p):
    cfg = model.config
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens}")
    if min(prompt_lens) < 1:
        raise ValueError("prompt_ids must hold at least one token")
    longest = max(prompt_lens) + max_new_tokens
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({max(prompt_lens)} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's max_position_embeddings={cfg.max_position_embeddings}")
    if cache not in CACHE_KINDS:
        raise ValueError(f"cache must be one of {CACHE_KINDS}, got {cache!r}")
    _check_sampling(temperature, top_k, top_p, cfg.vocab_size)


def _generator(seed, device):
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


@torch.inference_mode()
def iter_generate(model, prompt_ids: Sequence[int], max_new_tokens: int, *, use_cache: bool = True,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, eos_token_id: int | None = None,
                  cache: str = "prealloc") -> Iterator[Step]:
    """Yield one `Step` per new token (stops early after `eos_token_id`, which is yielded)."""
    prompt = [int(t) for t in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    _check_common(model, [len(prompt)], max_new_tokens, use_cache, cache, temperature, top_k, top_p)
    device = model.device
    gen = _generator(seed, device)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    if use_cache:
        kv = (ContiguousKVCache.for_model(model, 1, len(prompt) + max_new_tokens)
              if cache == "prealloc" else ConcatKVCache.for_model(model))
    new_input = ids
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model(new_input, cache=kv, last_only=True)[:, -1]  # prefill, then one token
        else:
            logits = model(ids, last_only=True)[:, -1]                   # the whole prefix again
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        yield Step(int(nxt[0]), logits[0])
        if eos_token_id is not None and int(nxt[0]) == eos_token_id:
            return
        new_input = nxt.view(1, 1)
        ids = torch.cat([ids, new_input], dim=1)


def generate(model, prompt_ids: Sequence[int], max_new_tokens: int, *, use_cache: bool = True,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_token_id: int | None = None,
             cache: str = "prealloc") -> list[int]:
    """Generate up to `max_new_tokens` tokens after `prompt_ids`; returns the new tokens only.

    use_cache=False recomputes the whole prefix at each step (the naive loop of chapter 02);
    use_cache=True keeps keys and values in a `ContiguousKVCache` (cache="prealloc", sized
    prompt + max_new_tokens) or a `ConcatKVCache` (cache="concat"). Generation stops after
    `eos_token_id` (included in the output) if given.
    """
    return [s.token for s in iter_generate(
        model, prompt_ids, max_new_tokens, use_cache=use_cache, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id, cache=cache)]


@torch.inference_mode()
def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                   use_cache: bool = True, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, seed: int | None = None,
                   eos_token_id: int | None = None, cache: str = "prealloc") -> list[list[int]]:
    """Generate for several prompts at once; returns each row's new tokens.

    Prompts of different lengths are **right-padded** and the cache keeps **per-row lengths**:
    under a causal mask a real token never attends to the pad tokens after it, so one prefill pass
    over the padded batch is exact; its logits are read at each row's last real token, the cache
    is then rewound to each row's true length (`set_lengths`) and decoding overwrites the pad
    columns. Each row sits at its own RoPE positions (`position_offset` is then a [B, 1] tensor).
    Without a cache every step reruns the padded batch the same way. A row stops after
    `eos_token_id`; the batch stops when every row has. cache="concat" needs equal prompt lengths.
    With sampling, one generator draws for the whole batch, so a row's tokens depend on the batch.
    """
    rows = [[int(t) for t in (p.tolist() if torch.is_tensor(p) else p)] for p in prompts]
    if not rows:
        raise ValueError("prompts must hold at least one prompt")
    lens = [len(r) for r in rows]
    _check_common(model, lens, max_new_tokens, use_cache, cache, temperature, top_k, top_p)
    if use_cache and cache == "concat" and len(set(lens)) > 1:
        raise ValueError("cache='concat' needs prompts of equal length (it keeps no per-row "
                         f"lengths); got lengths {lens}; use cache='prealloc'")
    device, B = model.device, len(rows)
    gen = _generator(seed, device)
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * B
    seqs = [list(r) for r in rows]  # prompt + generated so far, per row
    if use_cache:
        kv = (ContiguousKVCache.for_model(model, B, max(lens) + max_new_tokens)
              if cache == "prealloc" else ConcatKVCache.for_model(model))
    for step in range(max_new_tokens):
        if use_cache and step > 0:
            last = torch.tensor([[s[-1]] for s in seqs], dtype=torch.long, device=device)
            logits = model(last, cache=kv, last_only=True)[:, -1]
        else:
            T = max(len(s) for s in seqs)
            ids = torch.zeros(B, T, dtype=torch.long, device=device)  # pad id 0, never attended to
            for b, s in enumerate(seqs):
                ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
            idx = torch.tensor([b * T + len(s) - 1 for b, s in enumerate(seqs)], device=device)
            logits = model(ids, cache=kv if use_cache else None, logit_indices=idx)
            if use_cache and cache == "prealloc":
                kv.set_lengths(lens)
        nxt = sample_next(logits, temperature, top_k, top_p, gen).tolist()
        for b in range(B):
            seqs[b].append(nxt[b])
            if not done[b]:
                out[b].append(nxt[b])
                done[b] = eos_token_id is not None and nxt[b] == eos_token_id
        if all(done):
            break
    return out


# `kvlab.generate` names both this module and its main function. Once the module has been imported,
# Python binds the package attribute `kvlab.generate` to the module, so the module itself is made
# callable: `kvlab.generate(model, ids, n)` then works however it was reached.
class _CallableModule(sys.modules[__name__].__class__):
    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
