"""What machine is this? CPU, threads, GPU, Triton, versions: the facts every measurement needs.

`machine_info()` never raises: a missing GPU, a missing Triton (macOS has no Triton wheels) or an
unknown CPU name is reported as such, so chapter 00 runs everywhere. Benchmarks write the same
dictionary into their result files.
"""
from __future__ import annotations

import os
import platform
import sys


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _triton() -> tuple[bool, str | None, str | None]:
    """(importable, version, why not). Importing Triton is the only honest test of "available"."""
    try:
        import triton
    except Exception as e:  # ImportError, or a broken install raising something else
        return False, None, f"{type(e).__name__}: {e}"
    return True, getattr(triton, "__version__", "unknown"), None


def machine_info() -> dict:
    """A flat dictionary describing this machine and the library versions kvlab depends on."""
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": _usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_memory_gib": (round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
                           if torch.cuda.is_available() else None),
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }
    ok, version, why = _triton()
    info.update(triton_available=ok, triton=version, triton_error=why,
                triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("transformers", "gguf", "numpy"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = None
    return info


def describe(info: dict | None = None) -> str:
    """machine_info() as a few readable lines."""
    i = machine_info() if info is None else info
    gpu = f"{i['gpu']} ({i['gpu_memory_gib']} GiB)" if i["gpu"] else "none (CPU only)"
    if i["triton_available"]:
        interp = " (CPU interpreter: TRITON_INTERPRET=1)" if i["triton_interpret"] else ""
        triton = f"{i['triton']}{interp}"
    else:
        triton = f"not importable ({i['triton_error']}); the Triton kernels cannot run here"
    return "\n".join([
        f"platform : {i['platform']}, Python {i['python']}",
        f"cpu      : {i['cpu']}, {i['usable_cpus']} usable of {i['cpu_count']} logical, "
        f"torch uses {i['torch_threads']} threads",
        f"gpu      : {gpu}",
        f"triton   : {triton}",
        f"versions : torch {i['torch']}, transformers {i['transformers']}, gguf {i['gguf']}, "
        f"numpy {i['numpy']}",
    ])


if __name__ == "__main__":
    print(describe())
