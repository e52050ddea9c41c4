"""benchmarks/engine_cpu.py's kvlab variants build what their names say (before/after in one run
depends on it): reference = the chapters' Llama on torch attention, packed = FastLlama without
prepacking on torch attention, fast = prepacked FastLlama on the cpu backend."""
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import engine_cpu  # noqa: E402

from kvlab.attention import paged_cpu, paged_torch  # noqa: E402
from kvlab.model.fast import FastLlama, can_prepack  # noqa: E402
from kvlab.model.llama import Llama  # noqa: E402


def test_variants_build_the_paths_they_name():
    model = random_llama(dtype=torch.float32, max_position_embeddings=1024)
    ref = engine_cpu._kvlab_llm("reference", model, None, 4)
    assert isinstance(ref.runner.model, Llama) and ref.cache.ops is paged_torch
    packed = engine_cpu._kvlab_llm("packed", model, None, 4)
    assert isinstance(packed.runner.model, FastLlama) and not packed.runner.model.prepacked
    assert packed.cache.ops is paged_torch
    fast = engine_cpu._kvlab_llm("fast", model, None, 4)
    assert isinstance(fast.runner.model, FastLlama) and fast.cache.ops is paged_cpu
    assert fast.runner.model.prepacked == can_prepack(torch.zeros(1))
    with pytest.raises(SystemExit, match="not one of"):
        engine_cpu._kvlab_llm("turbo", model, None, 4)
