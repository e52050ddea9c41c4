"""Load a Hugging Face Llama folder (config.json + *.safetensors) into kvlab's Llama."""
from __future__ import annotations

import glob
import json
import os

import torch

from kvlab.model.config import LlamaConfig
from kvlab.model.llama import Llama


def config_from_hf(folder: str) -> LlamaConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {folder}: expected a Hugging Face model folder")
    with open(path) as f:
        c = json.load(f)
    if c.get("model_type") not in ("llama", "mistral"):
        raise ValueError(f"{path}: model_type is {c.get('model_type')!r}; kvlab loads Llama-family models "
                         "('llama', 'mistral')")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ValueError(f"{path}: attention_bias/mlp_bias are set; kvlab's Llama has no bias terms")
    # transformers >= 5 writes {"rope_parameters": {"rope_theta": ..., "rope_type": ...}}; older
    # versions write "rope_theta" and "rope_scaling" at the top level.
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{path}: rope_type {rope.get('rope_type', rope.get('type'))!r} is not supported; "
                         "kvlab implements plain RoPE (rope_type 'default')")
    rope_theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    # Mistral windows every layer; transformers' MistralConfig defaults sliding_window to 4096 when
    # the file has none (null: no window). A Llama config has no window.
    window = c.get("sliding_window", 4096) if c["model_type"] == "mistral" else None
    heads = c["num_attention_heads"]
    eos = c.get("eos_token_id")
    return LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
        num_heads=heads, num_kv_heads=c.get("num_key_value_heads", heads),
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        rope_theta=float(rope_theta), rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_token_id=c.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        sliding_window=window,
    )


def load_hf_folder(folder: str, device="cpu", dtype=torch.float32) -> Llama:
    from safetensors.torch import load_file

    cfg = config_from_hf(folder)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    state = {}
    for f in files:
        for k, v in load_file(f).items():
            state[k.removeprefix("model.")] = v.to(dtype)
    with torch.device("meta"):
        model = Llama(cfg)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    missing = expected - set(state)
    if missing:
        raise ValueError(f"{folder}: missing tensors {sorted(missing)[:5]} ({len(missing)} in all)")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device).eval()
