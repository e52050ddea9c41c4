"""A Llama-family decoder, written to be read (nanoGPT-style, one file).

Shapes use B = batch, T = new tokens in this forward pass, H = query heads, Hkv = key/value heads,
D = head dim. Keys and values go through a KV cache object (kvlab.cache.base); with no cache the
model recomputes attention over exactly the tokens it is given.

Sliding-window layers (`LlamaConfig.sliding_window`, `layer_types`) are applied by the cache, which
knows each layer's window (`sliding_windows`); the model builds its `NoCache` with its config's
windows and refuses a cache that does not apply them (`check_cache_windows`).
"""
from __future__ import annotations

import torch
from torch import nn

from kvlab.cache.base import KVCache, NoCache
from kvlab.model.config import LlamaConfig
from kvlab.model.layers import RMSNorm, SwiGLU, apply_rope, rope_cos_sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)

    def forward(self, x, cos, sin, cache: KVCache):
        B, T, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(B, T, c.num_heads, c.head_dim)
        k = self.k_proj(x).view(B, T, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(B, T, c.num_kv_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = cache.attend(self.layer, q, k, v)  # [B, T, H, D]
        return self.o_proj(out.reshape(B, T, c.num_heads * c.head_dim))


class DecoderLayer(nn.Module):
    """One transformer layer: attention and MLP, each behind an RMSNorm, with residuals."""

    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


Block = DecoderLayer   # the old name (chapter 00 imports it); a KV block is engine.block_manager.Block


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> tuple[int, int]:
    """The forward's input check, shared by every model class with Llama's contract
    (docs/architecture.md section 1): input_ids must be [batch, tokens] with ids in
    [0, vocab_size); returns (B, T). A ValueError names the argument and the limit."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    return tuple(input_ids.shape)


def check_cache_windows(cfg: LlamaConfig, cache) -> None:
    """A config with sliding-window layers needs a cache that applies exactly those windows
    (its `sliding_windows` attribute); anything else would attend over the wrong keys, silently."""
    want = cfg.sliding_windows
    if want is None:
        return
    have = getattr(cache, "sliding_windows", None)
    if have is None or tuple(have) != want:
        raise ValueError(f"the model has sliding-window layers (per layer: {list(want)}) but the cache "
                         f"({type(cache).__name__}) applies sliding_windows={have}: build the cache with "
                         "sliding_windows=model.config.sliding_windows (for_model does)")


def default_positions(input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Positions [B, T] when none are given: 0..T-1 shifted by the cache's `position_offset`
    attribute when it has one (a contiguous cache that already holds tokens)."""
    B, T = input_ids.shape
    offset = getattr(cache, "position_offset", 0)
    return (torch.arange(T, device=input_ids.device).unsqueeze(0) + offset).expand(B, T)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, logit_indices: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (or fewer rows, see below).

        positions: [B, T] absolute positions for RoPE; defaults to 0..T-1 shifted by the cache's
        `position_offset` attribute when it has one. cache: where keys and values live (None =
        recompute, no memory). last_only: logits for the last position only, [B, 1, vocab].
        logit_indices: indices into the flattened B*T tokens; returns [len(indices), vocab].
        Computing the vocabulary projection only where it is needed saves a large matmul.
        """
        cfg = self.config
        B, T = check_input_ids(input_ids, cfg.vocab_size)
        cache = NoCache(cfg.sliding_windows) if cache is None else cache
        check_cache_windows(cfg, cache)
        if positions is None:
            positions = default_positions(input_ids, cache)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype=self.dtype)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        cache.advance(T)
        if last_only:
            x = x[:, -1:]
        elif logit_indices is not None:
            x = x.reshape(B * T, -1)[logit_indices]
        return self.lm_head(self.norm(x)).float()
