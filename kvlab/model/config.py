"""The shape of a Llama-family decoder, as one plain dataclass."""
from __future__ import annotations

from dataclasses import dataclass

#: the per-layer attention kinds of `LlamaConfig.layer_types`, spelled as Hugging Face configs do
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class LlamaConfig:
    """Sizes of a Llama-family decoder, plus its attention pattern.

    Sliding-window layers (Mistral 7B, Gemma 2/3, gpt-oss) use the fields of Hugging Face's configs:
    `sliding_window` is the window W of a windowed layer, `layer_types` says per layer whether it is
    "sliding_attention" or "full_attention". With `sliding_window` set and no `layer_types`, every
    layer is windowed (Mistral); with neither, none is (the default). A windowed layer's query at
    position p attends to the keys at positions p - W + 1 .. p: W keys, itself included, as
    transformers' `sliding_window_overlay` (`kv_idx > q_idx - sliding_window`). `sliding_windows`
    gives the window of each layer.
    """
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
        self._check_windows()

    def _check_windows(self):
        w = self.sliding_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"LlamaConfig.sliding_window must be an integer >= 1 (or None: no window), "
                             f"got {w!r}")
        if self.layer_types is None:
            return
        if isinstance(self.layer_types, str):
            raise ValueError("LlamaConfig.layer_types must be a list with one entry per layer, got a string")
        types = tuple(self.layer_types)
        object.__setattr__(self, "layer_types", types)   # a list (from JSON) becomes a tuple
        if len(types) != self.num_layers:
            raise ValueError(f"LlamaConfig.layer_types must have one entry per layer (num_layers="
                             f"{self.num_layers}), got {len(types)}")
        bad = sorted({repr(t) for t in types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(f"LlamaConfig.layer_types entries must be one of {LAYER_TYPES}, got "
                             f"{', '.join(bad)}")
        if w is None and "sliding_attention" in types:
            raise ValueError("LlamaConfig.layer_types has 'sliding_attention' layers but "
                             "sliding_window is None: give the window size")

    @property
    def sliding_windows(self) -> tuple[int | None, ...] | None:
        """The window of each layer (None: full attention), or None when no layer has a window."""
        if self.sliding_window is None:
            return None
        types = self.layer_types or ("sliding_attention",) * self.num_layers
        windows = tuple(self.sliding_window if t == "sliding_attention" else None for t in types)
        return windows if any(x is not None for x in windows) else None

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (1 = MHA, num_heads = MQA)."""
        return self.num_heads // self.num_kv_heads

    def num_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h


# SmolLM2-135M-Instruct, as its GGUF metadata states it.
SMOLLM2_135M = LlamaConfig()
