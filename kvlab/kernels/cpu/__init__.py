"""C++ kernels for the CPU, compiled on first use with PyTorch's extension loader.

    paged_attention.cpp   attention that reads K/V in place from the block pool (no gathered copy):
                          decode rows, and any query row whose context is already in the cache

`load()` compiles the source once per machine (about 20 s here; PyTorch caches the build under
~/.cache/torch_extensions, keyed by the source) and returns the module, or None when no C++
compiler or no `ninja` is found, or the build fails; `why_unavailable()` then says why. Flags follow the CPU
that PyTorch itself dispatches to (`torch.backends.cpu.get_cpu_capability()`): AVX-512 or AVX2
when it uses them, plain -O3 otherwise (`-march=native` is avoided: it crashed other native
builds on the course machine). The PyTorch twin is `kvlab.attention.paged_torch`; the
equivalence tests are tests/test_attention_cpu_kernel.py.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("paged_attention.cpp")
_FLAGS = {
    "AVX512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
_state: dict = {}


def _flags() -> tuple[str, list[str]]:
    cap = torch.backends.cpu.get_cpu_capability()
    return cap, _FLAGS.get(cap, [])


def _ninja() -> str | None:
    """ninja's path; the `ninja` package's binary is put on PATH for PyTorch's loader when none is."""
    found = shutil.which("ninja")
    if found is None:
        try:
            import ninja
        except ImportError:
            return None
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        found = shutil.which("ninja")
    return found


def load():
    """The compiled module (with `paged_attention(...)`), or None; compiled at most once per process."""
    if "module" in _state:
        return _state["module"]
    module, why = None, None
    if os.environ.get("KVLAB_NO_CPU_KERNEL"):
        why = "KVLAB_NO_CPU_KERNEL is set"
    elif shutil.which(os.environ.get("CXX", "c++")) is None:
        why = "no C++ compiler (c++) on PATH"
    elif _ninja() is None:
        why = "no ninja (the `ninja` package, or one on PATH): PyTorch's extension loader builds with it"
    else:
        cap, flags = _flags()
        try:
            from torch.utils.cpp_extension import load as build
            module = build(name=f"kvlab_paged_attention_{cap.lower()}", sources=[str(_SOURCE)],
                           extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", *flags], extra_ldflags=["-fopenmp"],
                           verbose=False)
        except Exception as e:          # noqa: BLE001 - any build failure means: use the twin
            why = f"the build failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
    _state["module"], _state["why"] = module, why
    return module


@contextlib.contextmanager
def disabled():
    """Inside: `load()` returns None, so callers take their gather paths (the before of a benchmark)."""
    global load
    real = load
    load = lambda: None  # noqa: E731
    try:
        yield
    finally:
        load = real


def available() -> bool:
    return load() is not None


def why_unavailable() -> str | None:
    load()
    return _state["why"]
