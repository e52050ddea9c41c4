"""The KV memory calculator: how many bytes a model's cache holds, and how many sessions fit.

Per token, every attention layer stores one key and one value vector per KV head:

    bytes per token = layers x 2 (K and V) x kv_heads x head_dim x bytes per value

Multi-head attention (MHA) has kv_heads = heads; grouped-query attention (GQA, Ainslie et al.,
2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints") shares
one KV head among a group of query heads; multi-query attention (MQA, Shazeer, 2019, "Fast
Transformer Decoding: One Write-Head is All You Need") keeps a single KV head. Multi-head latent
attention (MLA, DeepSeek-AI, 2024, "DeepSeek-V2") stores no per-head keys and values at all: one
compressed latent vector of `kv_lora_rank` numbers plus one decoupled RoPE key of
`qk_rope_head_dim` numbers, shared by all heads, per layer and token.

A sliding-window layer (Beltagy et al., 2020, "Longformer"; Jiang et al., 2023, "Mistral 7B")
keeps only its last `sliding_window` tokens, so its cache stops growing there; Gemma 2 alternates
sliding-window and global layers (Gemma Team, 2024, "Gemma 2"). `kv_cache_bytes` accounts for both.

Units: bytes; GB means 10^9 bytes, as GPU datasheets and most papers write it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KVConfig:
    """The numbers of a model that decide its KV-cache size (plus its weight count)."""
    name: str
    num_layers: int
    num_heads: int                 # query heads
    num_kv_heads: int              # key/value heads (MHA: = num_heads, MQA: 1); unused for MLA
    head_dim: int
    hidden_size: int
    num_params: float              # total weights (all experts for a mixture of experts)
    max_context: int               # longest context the model card states
    kv_lora_rank: int = 0          # MLA: latent dimension stored per token and layer (0 = not MLA)
    qk_rope_head_dim: int = 0      # MLA: decoupled RoPE key dimension stored per token and layer
    sliding_window: int | None = None
    sliding_layers: int = 0        # how many of num_layers use the window (Mistral: all; Gemma 2: half)
    vocab_size: int = 0            # 0 = unknown; needed only to split off the embedding in FLOP counts
    tie_embeddings: bool = False   # the output projection reuses the input embedding matrix
    active_params: float | None = None  # weights one token passes through (mixture of experts); None = all
    source: str = ""
    notes: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "max_context"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"KVConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if not 0 <= self.sliding_layers <= self.num_layers:
            raise ValueError(f"KVConfig.sliding_layers must be in [0, {self.num_layers}], "
                             f"got {self.sliding_layers}")
        if self.sliding_layers and not (self.sliding_window and self.sliding_window > 0):
            raise ValueError("KVConfig.sliding_window must be positive when sliding_layers > 0")
        if self.vocab_size < 0:
            raise ValueError(f"KVConfig.vocab_size must be >= 0 (0 = unknown), got {self.vocab_size}")
        if self.active_params is not None and not 0 < self.active_params <= self.num_params:
            raise ValueError(f"KVConfig.active_params must be in (0, num_params={self.num_params}], "
                             f"got {self.active_params}")

    @property
    def attention(self) -> str:
        """"mla", "mqa", "mha" or "gqa"."""
        if self.kv_lora_rank:
            return "mla"
        if self.num_kv_heads == 1:
            return "mqa"
        return "mha" if self.num_kv_heads == self.num_heads else "gqa"

    def values_per_token_per_layer(self) -> int:
        """Numbers one layer stores per token: 2 x kv_heads x head_dim, or latent + RoPE key for MLA."""
        if self.kv_lora_rank:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> KVConfig:
        """A copy with some fields changed, e.g. `cfg.replace(num_kv_heads=1)` for the MQA variant."""
        import dataclasses
        return dataclasses.replace(self, **changes)


def as_kv_config(config) -> KVConfig:
    """A `KVConfig`, or anything shaped like `kvlab.model.config.LlamaConfig` (converted)."""
    if isinstance(config, KVConfig):
        return config
    if isinstance(config, str):
        if config not in MODELS:
            raise ValueError(f"unknown model {config!r}; known: {sorted(MODELS)}")
        return MODELS[config]
    try:
        params = config.num_parameters() if hasattr(config, "num_parameters") else 0
        windows = getattr(config, "sliding_windows", None) or ()          # a windowed LlamaConfig
        return KVConfig(name=type(config).__name__, num_layers=config.num_layers,
                        num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                        head_dim=config.head_dim, hidden_size=config.hidden_size,
                        num_params=params,
                        max_context=getattr(config, "max_position_embeddings", 1) or 1,
                        vocab_size=getattr(config, "vocab_size", 0) or 0,
                        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                        sliding_window=config.sliding_window if windows else None,
                        sliding_layers=sum(w is not None for w in windows))
    except AttributeError as e:
        raise TypeError("config must be a KVConfig, a model name or a LlamaConfig-like object: "
                        f"{e}") from None


def _check_dtype_bytes(dtype_bytes):
    if not dtype_bytes > 0:
        raise ValueError(f"dtype_bytes must be positive, got {dtype_bytes}")


def kv_bytes_per_token(config, dtype_bytes: float = 2, *, kv_cache_dtype: str | None = None) -> float:
    """Bytes one token adds to the cache, all layers, K and V, while it is inside every window.

    `dtype_bytes`: bytes per stored number (2 = fp16/bf16, 1 = fp8/int8 ignoring scales, 4 = fp32).
    `kv_cache_dtype` ("auto", "int8", "fp8", "int4", "int2"): count a quantized format exactly, scales and
    zero points included, as `kvlab.quant.bytes_per_token` does (MHA/GQA/MQA only). Returns an int
    when dtype_bytes is an int and no quantized format is given.
    """
    cfg = as_kv_config(config)
    if kv_cache_dtype is not None:
        if cfg.attention == "mla":
            raise ValueError("kv_cache_dtype is counted for MHA/GQA/MQA layouts only, not MLA; "
                             "use dtype_bytes for MLA")
        from kvlab import quant  # lazy: the quantization package is optional here
        return quant.bytes_per_token(cfg, kv_cache_dtype, model_dtype=int(dtype_bytes))
    _check_dtype_bytes(dtype_bytes)
    return cfg.num_layers * cfg.values_per_token_per_layer() * dtype_bytes


def kv_cache_bytes(config, tokens: int, batch: int = 1, dtype_bytes: float = 2, *,
                   kv_cache_dtype: str | None = None) -> float:
    """Bytes of the cache of `batch` sequences of `tokens` tokens each.

    Sliding-window layers hold min(tokens, sliding_window) tokens; the other layers hold all.
    """
    if tokens < 0 or batch < 0:
        raise ValueError(f"tokens and batch must be >= 0, got tokens={tokens}, batch={batch}")
    cfg = as_kv_config(config)
    per_layer = kv_bytes_per_token(cfg, dtype_bytes, kv_cache_dtype=kv_cache_dtype) / cfg.num_layers
    full_layers = cfg.num_layers - cfg.sliding_layers
    held = full_layers * tokens
    if cfg.sliding_layers:
        held += cfg.sliding_layers * min(tokens, cfg.sliding_window)
    total = per_layer * held * batch
    return int(total) if float(total).is_integer() else total


def weight_bytes(config, dtype_bytes: float = 2) -> float:
    """Bytes of the model's weights at `dtype_bytes` per parameter."""
    return as_kv_config(config).num_params * dtype_bytes


def max_concurrent_sequences(config, gpu_bytes: float, tokens_per_seq: int, *,
                             weight_bytes: float | None = None, utilization: float = 0.9,
                             dtype_bytes: float = 2, weight_dtype_bytes: float = 2,
                             kv_cache_dtype: str | None = None, activation_bytes: float = 0.0) -> int:
    """How many sequences of `tokens_per_seq` tokens fit in the cache of one GPU.

    The cache gets `utilization x gpu_bytes - weight_bytes - activation_bytes`, as in vLLM: its
    `gpu_memory_utilization` (default 0.9) bounds everything vLLM allocates, the weights, the peak
    activations of a profiling forward and the cache; the rest of the device is left to the CUDA
    context and other processes. `activation_bytes` defaults to 0, which gives an upper bound
    (chapter 06 states one). `weight_bytes` defaults to num_params x weight_dtype_bytes. Each
    sequence is assumed to reserve its full `tokens_per_seq` (a contiguous cache sized for the
    request; paging is what relaxes this). Returns 0 when the weights alone do not fit.
    """
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    if gpu_bytes <= 0 or tokens_per_seq <= 0:
        raise ValueError(f"gpu_bytes and tokens_per_seq must be positive, got {gpu_bytes}, {tokens_per_seq}")
    cfg = as_kv_config(config)
    w = cfg.num_params * weight_dtype_bytes if weight_bytes is None else weight_bytes
    if activation_bytes < 0:
        raise ValueError(f"activation_bytes must be >= 0, got {activation_bytes}")
    free = gpu_bytes * utilization - w - activation_bytes
    if free <= 0:
        return 0
    return int(math.floor(free / kv_cache_bytes(cfg, tokens_per_seq, 1, dtype_bytes,
                                                kv_cache_dtype=kv_cache_dtype)))


# Every number below was checked against the cited paper table and the model's published
# config.json (num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim or
# hidden_size / heads, vocab_size, tie_word_embeddings, sliding_window, max_position_embeddings).
MODELS: dict[str, KVConfig] = {
    m.name: m for m in [
        KVConfig("llama-2-7b", num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                 hidden_size=4096, num_params=6.74e9, max_context=4096, vocab_size=32000,
                 source="Touvron et al., 2023, 'Llama 2: Open Foundation and Fine-Tuned Chat Models', "
                        "Table 1 and the meta-llama/Llama-2-7b-hf config.json"),
        KVConfig("llama-2-13b", num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128,
                 hidden_size=5120, num_params=13.0e9, max_context=4096, vocab_size=32000,
                 source="Touvron et al., 2023, 'Llama 2', Table 1; meta-llama/Llama-2-13b-hf config.json"),
        KVConfig("llama-2-70b", num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                 hidden_size=8192, num_params=69.0e9, max_context=4096, vocab_size=32000,
                 source="Touvron et al., 2023, 'Llama 2', Table 1 (GQA for 34B/70B); "
                        "meta-llama/Llama-2-70b-hf config.json"),
        KVConfig("llama-3.1-8b", num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                 hidden_size=4096, num_params=8.03e9, max_context=131072, vocab_size=128256,
                 source="Llama Team, 2024, 'The Llama 3 Herd of Models', Table 3; "
                        "meta-llama/Llama-3.1-8B config.json and model card (8.03B params)"),
        KVConfig("llama-3.1-70b", num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                 hidden_size=8192, num_params=70.6e9, max_context=131072, vocab_size=128256,
                 source="Llama Team, 2024, 'The Llama 3 Herd of Models', Table 3; "
                        "meta-llama/Llama-3.1-70B config.json and model card (70.6B params)"),
        KVConfig("mistral-7b", num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                 hidden_size=4096, num_params=7.24e9, max_context=8192, vocab_size=32000,
                 sliding_window=4096, sliding_layers=32,
                 source="Jiang et al., 2023, 'Mistral 7B', Table 1 (window 4096, context 8192, "
                        "every layer windowed); mistralai/Mistral-7B-v0.1 model card (7.24B params)",
                 notes={"version": "v0.1; v0.2 and later drop the window (sliding_window null, "
                                   "32k context), so their cache grows with every token"}),
        KVConfig("qwen2.5-7b", num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                 hidden_size=3584, num_params=7.61e9, max_context=131072, vocab_size=152064,
                 source="Qwen Team, 2024, 'Qwen2.5 Technical Report', Table 1; Qwen/Qwen2.5-7B model "
                        "card (28 layers, 28 Q / 4 KV heads, 7.61B params, 131,072 context)",
                 notes={"window": "config.json names a sliding_window but sets use_sliding_window "
                                  "false: every layer keeps the full context"}),
        KVConfig("deepseek-v3", num_layers=61, num_heads=128, num_kv_heads=128, head_dim=128,
                 hidden_size=7168, num_params=671e9, max_context=131072, vocab_size=129280,
                 kv_lora_rank=512, qk_rope_head_dim=64, active_params=37e9,
                 source="DeepSeek-AI, 2024, 'DeepSeek-V3 Technical Report', section 4.2 (61 layers, "
                        "128 heads, d_c = 512, d_h^R = 64, 671B total / 37B active params, 128K context); "
                        "deepseek-ai/DeepSeek-V3 config.json (vocab 129,280)",
                 notes={"head_dim": "128 is the non-RoPE query/key and the value head size; "
                                    "queries and keys have 128 + 64 = 192 dims per head"}),
        KVConfig("gemma-2-9b", num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256,
                 hidden_size=3584, num_params=9.24e9, max_context=8192, vocab_size=256000,
                 tie_embeddings=True, sliding_window=4096, sliding_layers=21,
                 source="Gemma Team, 2024, 'Gemma 2: Improving Open Language Models at a Practical "
                        "Size', Table 1 (42 layers, 16 Q / 8 KV heads, head 256, local window 4096 "
                        "alternating with global layers, context 8192); google/gemma-2-9b card (9.24B)",
                 notes={"head_dim": "16 x 256 = 4096 query dims, more than hidden_size 3584"}),
        KVConfig("smollm2-135m", num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                 hidden_size=576, num_params=134_515_008, max_context=8192, vocab_size=49152,
                 tie_embeddings=True,
                 source="Allal et al., 2025, 'SmolLM2'; HuggingFaceTB/SmolLM2-135M-Instruct "
                        "config.json and the GGUF metadata kvlab loads (params counted from them)"),
    ]
}
