"""Small random-weight models shaped like the sliding-window families, for tests and chapters.

A Mistral 7B or Gemma 2 checkpoint does not fit the course machine, and what the KV cache sees of
a model is its attention pattern and head shape, not its weights. These presets keep each family's
pattern at toy size:

- `MISTRAL_TINY`: every layer windowed (Jiang et al., 2023, "Mistral 7B": window 4096 on all 32
  layers), 4 query heads per KV head as Mistral 7B's 32/8, untied embeddings;
- `GEMMA2_TINY`: windowed and global layers alternating, the first one windowed (Gemma Team, 2024,
  "Gemma 2": window 4096 on every other layer; Hugging Face's Gemma2Config spells it
  layer_types = ["sliding_attention", "full_attention", ...]; gpt-oss uses the same alternation),
  2 query heads per KV head as Gemma 2 2B's 8/4, tied embeddings.

Only the shape and the attention pattern are the families'; the blocks stay kvlab's Llama blocks
(Gemma's GeGLU, soft-capping and extra norms are not modelled). `random_model(name)` builds one
with seeded random weights; `SHAPES` names them.
"""
from __future__ import annotations

import dataclasses

import torch

from kvlab.model.config import LlamaConfig
from kvlab.model.llama import Llama

_TOY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, head_dim=16,
            rope_theta=10000.0, max_position_embeddings=512, sliding_window=16)

MISTRAL_TINY = LlamaConfig(**_TOY, num_heads=4, num_kv_heads=1, tie_word_embeddings=False)
GEMMA2_TINY = LlamaConfig(**_TOY, num_heads=4, num_kv_heads=2, tie_word_embeddings=True,
                          layer_types=("sliding_attention", "full_attention") * 2)

SHAPES = {"mistral-tiny": MISTRAL_TINY, "gemma2-tiny": GEMMA2_TINY}


def random_model(config: str | LlamaConfig = "mistral-tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                 std: float = 0.3, **overrides) -> Llama:
    """A Llama with `config` (a name in SHAPES or a LlamaConfig; `overrides` replace its fields, e.g.
    sliding_window=8) and seeded random weights: matrices N(0, std^2), norm weights U(0.5, 1.5),
    large enough that every layer, and so every window, changes the output. The global random
    state is left as it was."""
    if isinstance(config, str):
        if config not in SHAPES:
            raise ValueError(f"unknown shape {config!r}; known: {sorted(SHAPES)}")
        config = SHAPES[config]
    cfg = dataclasses.replace(config, **overrides)
    with torch.random.fork_rng(devices=[]):
        model = Llama(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std, generator=g)
            else:
                p.uniform_(0.5, 1.5, generator=g)
    return model.to(dtype)
