"""SamplingParams (shaped like vLLM's) and the sampler that turns logits into next tokens.

Greedy is temperature 0. Otherwise logits are divided by the temperature, cut to the top_k most
likely tokens, then to the smallest set whose probability reaches top_p ("nucleus sampling",
Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration"), and one token is drawn.
A request with a `seed` draws from its own generator, so its output does not depend on what else
is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_tokens is None or self.max_tokens <= 0:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """logits [..., V] divided by `temperature` (> 0), then cut to the `top_k` most likely tokens
    and to the smallest set whose probability reaches `top_p` (the rest -inf), in float32.

    The one filter of kvlab: `sample` below (the engine, SamplingParams' top_k = -1 means off) and
    `kvlab.generate.sample_next` (top_k = None means off) both use it."""
    x = logits.float() / temperature
    if top_k is not None and 0 < top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        # drop a token when the tokens ranked before it already reach top_p (the top one stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        x = x.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return x


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits [S, V] float32, one SamplingParams and optional generator per row -> S token ids."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for i, p in enumerate(params):
        if p.greedy:
            out.append(greedy[i])
            continue
        row = filter_logits(logits[i], p.temperature, p.top_k if p.top_k > 0 else None, p.top_p)
        probs = torch.softmax(row, dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=generators[i])))
    return out
