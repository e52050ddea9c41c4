"""Write a kvlab Llama as a Hugging Face model folder (config.json, model.safetensors, tokenizer).

The course model ships as a Q4_1 GGUF file; engines such as vLLM and Hugging Face `transformers`
read Hugging Face folders. `export_hf` writes the weights kvlab has loaded (dequantized from the
GGUF file, in float32 unless asked otherwise), so every engine compared in benchmarks/ computes
with the same numbers. `kvlab.load_model(folder)` reads the folder back (kvlab/model/hf_loader.py).

    python -m kvlab.model.hf_export ~/.cache/kvlab/hf/SmolLM2-135M-Instruct
"""
from __future__ import annotations

import json
import os
import sys

import torch

from kvlab.model.config import LlamaConfig

DEFAULT_HF_DIR = os.path.join(os.path.expanduser("~"), ".cache", "kvlab", "hf", "SmolLM2-135M-Instruct")

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}


def hf_config(cfg: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The `config.json` of a `LlamaForCausalLM` with kvlab's configuration.

    RoPE is written both ways transformers has read it: `rope_theta` at the top level (before 5.0)
    and `rope_parameters` (5.0 on). A config whose every layer is windowed is written as a
    `MistralForCausalLM` (the same blocks, plus `sliding_window`); one that mixes windowed and full
    layers has no Llama-family Hugging Face architecture and is refused."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"hf_config: dtype must be one of {list(_DTYPE_NAMES.values())}, got {dtype}")
    windows = cfg.sliding_windows
    arch = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if windows is not None:
        if None in windows:
            raise ValueError("hf_config: layer_types mixes sliding_attention and full_attention layers; "
                             "no Llama-family Hugging Face architecture (llama, mistral) expresses that")
        arch = {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                "sliding_window": cfg.sliding_window}
    return {
        **arch,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "torch_dtype": _DTYPE_NAMES[dtype], "dtype": _DTYPE_NAMES[dtype],
    }


def hf_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """kvlab parameter names -> Hugging Face names (`model.` prefix; `lm_head` only when untied)."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            if model.config.tie_word_embeddings:
                continue  # tied: the file holds the embedding once, as Hugging Face's own do
            key = name
        else:
            key = "model." + name
        out[key] = t.detach().to("cpu", dtype or t.dtype).contiguous()
    return out


def export_hf(path: str, model=None, tokenizer=None, dtype: torch.dtype | None = None) -> str:
    """Write `model` (default: the course model, `kvlab.load_model()`) and its tokenizer to the
    folder `path` as a Hugging Face Llama checkpoint; returns the folder.

    dtype: the weights' precision in the file (default: the model's own). The files are written
    to a temporary folder first and moved into place, so a reader never sees half a checkpoint.
    """
    from safetensors.torch import save_file

    if model is None:
        from kvlab.model.load import load_model

        model, tok = load_model()
        tokenizer = tok if tokenizer is None else tokenizer
    dtype = dtype or model.dtype
    path = os.path.abspath(os.fspath(path))
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    save_file(hf_state_dict(model, dtype), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config(model.config, dtype), f, indent=2)
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if os.path.isdir(path):
        import shutil

        shutil.rmtree(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    print(export_hf(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_HF_DIR))
