"""Load a Llama-architecture GGUF file (llama.cpp's format) into kvlab's Llama.

Quantized tensors (Q4_1, Q8_0, ...) are dequantized with the `gguf` package. llama.cpp's converter
permutes the rows of the query and key projections so that RoPE rotates interleaved pairs
(x0, x1), (x2, x3), ...; kvlab (like Hugging Face) rotates the halves (x_i, x_{i+D/2}), so the
loader undoes that permutation, per head.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from kvlab.model.config import LlamaConfig
from kvlab.model.llama import Llama


def _open(path: str):
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on a truncated or foreign file
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                         f"expected a complete GGUF v2/v3 file") from e


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader, path: str = "<gguf>") -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; kvlab loads 'llama' GGUF files only")
    a = "llama."
    heads = int(_field(reader, a + "attention.head_count"))
    hidden = int(_field(reader, a + "embedding_length"))
    tensors = {t.name for t in reader.tensors}
    vocab = _field(reader, a + "vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, a + "feed_forward_length")),
        num_layers=int(_field(reader, a + "block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, a + "attention.head_count_kv", heads)),
        head_dim=int(_field(reader, a + "rope.dimension_count", hidden // heads)),
        rope_theta=float(_field(reader, a + "rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(_field(reader, a + "context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of a q or k projection [n_heads*D, in]."""
    d_half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, d_half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {  # GGUF name -> kvlab name (per layer, "{i}" filled in)
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _dequantize(t) -> np.ndarray:
    import gguf

    shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists the fastest dimension first
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def read_gguf_state(path: str) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """The config and the dequantized float32 weights, named as kvlab's Llama names them."""
    reader = _open(path)
    cfg = config_from_gguf(reader, path)
    state = {}
    for t in reader.tensors:
        w = _dequantize(t)
        if t.name == "token_embd.weight":
            state["embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            state["norm.weight"] = w
        elif t.name == "output.weight":
            state["lm_head.weight"] = w
        elif t.name.startswith("blk."):
            _, i, kind, _ = t.name.split(".")
            if kind not in _NAMES:
                continue
            if kind == "attn_q":
                w = unpermute_rope_rows(w, cfg.num_heads)
            elif kind == "attn_k":
                w = unpermute_rope_rows(w, cfg.num_kv_heads)
            state[f"layers.{i}.{_NAMES[kind]}.weight"] = w
    return cfg, state


def build_model(cfg: LlamaConfig, state: dict, path: str, device="cpu", dtype=torch.float32) -> Llama:
    with torch.device("meta"):
        model = Llama(cfg)
    expected = set(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = expected - set(state)
    if missing:
        raise ValueError(f"{path}: missing tensors {sorted(missing)[:5]}... ({len(missing)} in all); "
                         "expected a complete Llama GGUF file")
    tensors = {k: (v if isinstance(v, torch.Tensor) else torch.tensor(v)).to(dtype) for k, v in state.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device).eval()
