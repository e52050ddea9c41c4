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
  - on a CPU with oneDNN, every weight is *prepacked* once (`PackedLinear`): reordered into the
    blocked layout oneDNN's matrix-product kernels read, so a step does not repack it. PyTorch's
    default CPU `F.linear` goes to MKL (float32) or to oneDNN with a reorder per call; for a
    135M model whose decode steps are bandwidth-bound products of a few rows, the prepacked
    path measured 2.5x faster per decode step on the course machine (the numbers, and how they
    were taken: benchmarks/results/engine_cpu_vllm_notes.md). Off the CPU, in float64, or in
    bfloat16 on a CPU without native bfloat16, it falls back to `F.linear`;
  - nothing else changes: the same KV-cache protocol (`cache.attend`), the same positions, the
    same logits contract, so `kvlab.LLM((FastLlama.from_llama(model), tokenizer))` serves it.
    Sliding-window layers too: the cache applies them, as for the reference.

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
from kvlab.model.llama import check_cache_windows, check_input_ids, default_positions


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether oneDNN can prepack this weight: a CPU tensor in float32, or in bfloat16 on a CPU with
    native bfloat16 (AVX512-BF16 or AMX); float64 and every other device use F.linear."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x @ weight.T, the weight reordered once for oneDNN (`prepack=True` where it can be).

    `torch.ops.mkldnn._reorder_linear_weight` and `_linear_pointwise` are the ops PyTorch's own
    CPU inductor backend emits for a frozen linear layer; they are private, so the fallback is kept
    and tested (tests/test_model_fast.py runs both and compares them with F.linear). A prepacked
    weight is in oneDNN's CPU layout: move or cast the reference model first, then pack.
    """

    # the number of rows the packing is tuned for: a decode batch, not a prompt
    PACK_ROWS = 16

    def __init__(self, weight: torch.Tensor, prepack: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.prepacked = bool(prepack) and can_prepack(weight)
        w = weight.detach().contiguous()
        if self.prepacked:
            w = torch.ops.mkldnn._reorder_linear_weight(w, self.PACK_ROWS)
        self.weight = nn.Parameter(w, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, prepacked={self.prepacked}"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """kvlab.model.layers.RMSNorm as one fused op: float32 inside, the input's dtype out."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [N, H, D] by cos/sin [N, 1, D], as kvlab.model.layers.apply_rope."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class FastLayer(nn.Module):
    """One decoder layer of `FastLlama`, built from a reference `kvlab.model.llama.DecoderLayer`."""

    def __init__(self, cfg: LlamaConfig, layer: int, ref, prepack: bool = True):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        a, m = ref.self_attn, ref.mlp
        self.qkv = PackedLinear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), prepack)
        self.o = PackedLinear(a.o_proj.weight, prepack)
        self.gate_up = PackedLinear(torch.cat([m.gate_proj.weight, m.up_proj.weight]), prepack)
        self.down = PackedLinear(m.down_proj.weight, prepack)
        self.norm1 = nn.Parameter(ref.input_layernorm.weight.detach(), requires_grad=False)
        self.norm2 = nn.Parameter(ref.post_attention_layernorm.weight.detach(), requires_grad=False)

    def forward(self, x, cos, sin, cache: KVCache):
        B, T, h = x.shape
        c = self.cfg
        qkv = self.qkv(rms_norm(x, self.norm1, c.rms_norm_eps))                    # [B, T, (H+2Hkv)D]
        qk = qkv[..., :self.q_size + self.kv_size].reshape(B * T, c.num_heads + c.num_kv_heads, c.head_dim)
        qk = rope_(qk, cos, sin).to(x.dtype)
        q = qk[:, :c.num_heads].view(B, T, c.num_heads, c.head_dim)
        k = qk[:, c.num_heads:].view(B, T, c.num_kv_heads, c.head_dim)
        v = qkv[..., self.q_size + self.kv_size:].view(B, T, c.num_kv_heads, c.head_dim)
        out = cache.attend(self.layer, q, k, v)                                     # [B, T, H, D]
        x = x + self.o(out.reshape(B, T, self.q_size))
        gu = self.gate_up(rms_norm(x, self.norm2, c.rms_norm_eps))
        g, u = gu.chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class FastLlama(nn.Module):
    """Llama's forward contract (docs/architecture.md, section 1) on packed weights.

    `FastLlama(model)` or `FastLlama.from_llama(model)` packs a kvlab Llama's weights (same device
    and dtype; the embedding is shared). `prepack=False` keeps plain F.linear products (the packing
    of q/k/v and gate/up stays): the twin the prepacked path is tested against.
    """

    def __init__(self, model, prepack: bool = True):
        super().__init__()
        cfg = model.config
        self.config = cfg
        with torch.no_grad():
            self.embed_tokens = model.embed_tokens
            self.layers = nn.ModuleList(FastLayer(cfg, i, layer, prepack) for i, layer in enumerate(model.layers))
            self.norm = nn.Parameter(model.norm.weight.detach(), requires_grad=False)
            self.lm_head = PackedLinear(model.lm_head.weight, prepack)
        self.eval()

    @classmethod
    def from_llama(cls, model, prepack: bool = True) -> FastLlama:
        """Pack a kvlab Llama's weights (same device and dtype); the embedding is shared."""
        return cls(model, prepack=prepack)

    @property
    def prepacked(self) -> bool:
        """Whether the products run on oneDNN-prepacked weights (see `can_prepack`)."""
        return self.lm_head.prepacked

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
        B, T = check_input_ids(input_ids, self.config.vocab_size)
        cfg = self.config
        cache = NoCache(cfg.sliding_windows) if cache is None else cache
        check_cache_windows(cfg, cache)
        if positions is None:
            positions = default_positions(input_ids, cache)
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
            return self.lm_head(rms_norm(x, self.norm, cfg.rms_norm_eps)).float()
