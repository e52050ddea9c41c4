"""kvlab: a course and a paged, prefix-cached, quantized KV-cache inference engine.

Names are imported lazily, so `import kvlab` stays fast and a missing optional dependency
(Triton on macOS) only matters when that part is used.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "kvlab.model.load",
    "default_model_path": "kvlab.model.load",
    "Llama": "kvlab.model.llama",
    "LlamaConfig": "kvlab.model.config",
    "LLM": "kvlab.engine.llm",
    "SamplingParams": "kvlab.engine.sampling",
    "generate": "kvlab.generate",
    "generate_batch": "kvlab.generate",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvlab' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
