"""The fast twin of kvlab.model.llama.Llama for the CPU: the same model with fewer, larger ops.

`Llama` (kvlab/model/llama.py) is the readable reference the chapters teach: one nn.Linear per
projection, RMSNorm, RoPE and SwiGLU as separate modules. On a CPU, a decode step of a 135M model
is dozens of small matrix products per layer, and every op pays a dispatch and, with more than
one thread, an OpenMP fork/join. `FastLlama` computes the same function with the weights
rearranged (a packing the Llama family's serving engines use too, vLLM's QKVParallelLinear and
MergedColumnParallelLinear among them):

  - q, k and v come out of one matrix product with the three weights stacked ([Hq + 2 Hkv] * D
    rows), gate and up out of one ([2 I] rows): 7 products per layer become 4;
  - RoPE rotates q and k together, in one pass over the stacked heads;
  - RMSNorm is torch's fused `F.rms_norm` (one kernel, float32 inside, as the reference);
  - nothing else changes: the same KV-cache protocol (`cache.attend`), the same positions, the
    same logits contract, so `kvlab.LLM((FastLlama.from_llama(model), tokenizer))` serves it.

The weights are copies in the packed layout (the projections are concatenated once), sharing
the embedding, so it costs the model's size once more while both exist; keep one.
Tested equal to the reference on random weights (float64) and greedy-equal on the real model
(tests/test_model_fast.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.cache.base import KVCache, NoCache
from kvlab.model.config import LlamaConfig
from kvlab.model.layers import rope_cos_sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """kvlab.model.layers.RMSNorm as one fused op: float32 inside, the input's dtype out."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [N, H, D] by cos/sin [N, 1, D], as kvlab.model.layers.apply_rope."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class FastLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.qkv = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size, h), requires_grad=False)
        self.o = nn.Parameter(torch.empty(h, self.q_size), requires_grad=False)
        self.gate_up = nn.Parameter(torch.empty(2 * i, h), requires_grad=False)
        self.down = nn.Parameter(torch.empty(h, i), requires_grad=False)
        self.norm1 = nn.Parameter(torch.empty(h), requires_grad=False)
        self.norm2 = nn.Parameter(torch.empty(h), requires_grad=False)

    def forward(self, x, cos, sin, cache: KVCache):
        B, T, h = x.shape
        c = self.cfg
        qkv = F.linear(rms_norm(x, self.norm1, c.rms_norm_eps), self.qkv)         # [B, T, (H+2Hkv)D]
        qk = qkv[..., :self.q_size + self.kv_size].view(B * T, c.num_heads + c.num_kv_heads, c.head_dim)
        qk = rope_(qk, cos, sin).to(x.dtype)
        q = qk[:, :c.num_heads].view(B, T, c.num_heads, c.head_dim)
        k = qk[:, c.num_heads:].view(B, T, c.num_kv_heads, c.head_dim)
        v = qkv[..., self.q_size + self.kv_size:].view(B, T, c.num_kv_heads, c.head_dim)
        out = cache.attend(self.layer, q, k, v)                                     # [B, T, H, D]
        x = x + F.linear(out.reshape(B, T, self.q_size), self.o)
        gu = F.linear(rms_norm(x, self.norm2, c.rms_norm_eps), self.gate_up)
        g, u = gu.chunk(2, dim=-1)
        return x + F.linear(F.silu(g) * u, self.down)


class FastLlama(nn.Module):
    """Llama's forward contract (docs/architecture.md, section 1) on packed weights."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(FastLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_llama(cls, model) -> FastLlama:
        """Pack a kvlab Llama's weights (same device and dtype); the embedding is shared."""
        cfg = model.config
        with torch.device("meta"):
            fast = cls(cfg)
        fast.embed_tokens = model.embed_tokens
        for dst, src in zip(fast.layers, model.layers):
            a, m = src.self_attn, src.mlp
            dst.qkv = nn.Parameter(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                                   requires_grad=False)
            dst.o = nn.Parameter(a.o_proj.weight.detach(), requires_grad=False)
            dst.gate_up = nn.Parameter(torch.cat([m.gate_proj.weight, m.up_proj.weight]), requires_grad=False)
            dst.down = nn.Parameter(m.down_proj.weight.detach(), requires_grad=False)
            dst.norm1 = nn.Parameter(src.input_layernorm.weight.detach(), requires_grad=False)
            dst.norm2 = nn.Parameter(src.post_attention_layernorm.weight.detach(), requires_grad=False)
        fast.norm = nn.Parameter(model.norm.weight.detach(), requires_grad=False)
        fast.lm_head = nn.Parameter(model.lm_head.weight.detach(), requires_grad=False)
        return fast.eval()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, logit_indices: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """As kvlab.model.llama.Llama.forward: input_ids [B, T] -> float32 logits."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        cfg = self.config
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        cache = NoCache() if cache is None else cache
        if positions is None:
            offset = getattr(cache, "position_offset", 0)
            positions = (torch.arange(T, device=input_ids.device).unsqueeze(0) + offset).expand(B, T)
        cos, sin = rope_cos_sin(positions.reshape(B * T), cfg.head_dim, cfg.rope_theta, dtype=torch.float32)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)     # [B*T, 1, D]: broadcast over q and k heads
        if self.dtype != torch.float32:                   # the reference rotates in the model dtype
            cos, sin = cos.to(self.dtype), sin.to(self.dtype)
        x = self.embed_tokens(input_ids)
        with torch.no_grad():
            for layer in self.layers:
                x = layer(x, cos, sin, cache)
            cache.advance(T)
            if last_only:
                x = x[:, -1:]
            elif logit_indices is not None:
                x = x.reshape(B * T, -1)[logit_indices]
            return F.linear(rms_norm(x, self.norm, cfg.rms_norm_eps), self.lm_head).float()
