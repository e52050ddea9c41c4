"""kvlab.costs.machine never raises: no GPU, no Triton (macOS), no /proc/cpuinfo are reported, not fatal."""
import builtins

import torch

from kvlab.costs import machine


def test_machine_info_describes_this_machine():
    info = machine.machine_info()
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    assert (info["gpu"] is None) == (not torch.cuda.is_available())
    assert info["usable_cpus"] >= 1 and info["torch_threads"] >= 1
    text = machine.describe(info)
    for key in ("platform", "cpu", "gpu", "triton", "versions"):
        assert f"{key:9s}:" in text


def test_missing_triton_is_reported_not_raised(monkeypatch):
    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    info = machine.machine_info()
    assert info["triton_available"] is False and info["triton"] is None
    assert "ImportError" in info["triton_error"]
    assert "not importable" in machine.describe(info)


def test_no_gpu_and_no_cpuinfo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(builtins, "open", _raise_oserror(builtins.open))
    info = machine.machine_info()
    assert info["gpu"] is None and info["gpu_memory_gib"] is None
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert "none (CPU only)" in machine.describe(info)


def _raise_oserror(real_open):
    def fake_open(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)
    return fake_open
