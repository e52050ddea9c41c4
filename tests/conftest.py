"""Shared fixtures. Triton runs in its CPU interpreter unless a GPU run is asked for (--gpu)."""
import os

import pytest

if "--gpu" not in os.sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before any kernel is defined
os.environ.setdefault("KVLAB_SMOKE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)  # xdist runs one worker per core: more threads per worker oversubscribe


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False, help="run the GPU tests on CUDA")


def pytest_collection_modifyitems(config, items):
    from kvlab.course.paths import REQUIRES, missing_requirements

    for item in items:  # a chapter that needs a package missing here (Triton on macOS) is skipped
        chapter = next((c for c in REQUIRES if c in item.nodeid), None)
        if chapter and (missing := missing_requirements(chapter)):
            item.add_marker(pytest.mark.skip(reason=f"{chapter} needs {', '.join(missing)}"))
    if config.getoption("--gpu"):
        return
    skip = pytest.mark.skip(reason="GPU test: run with --gpu on a CUDA machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def real_model():
    """(model, tokenizer): SmolLM2-135M-Instruct, float32, CPU. Loaded once per test session."""
    import kvlab

    model, tok = kvlab.load_model()
    return model, tok


@pytest.fixture(scope="session")
def tiny_config():
    from kvlab.model.config import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                       max_position_embeddings=512)


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """A small random-weight Llama (GQA 4/2) for fast tests of everything around the model."""
    from kvlab.model.llama import Llama

    torch.manual_seed(0)
    model = Llama(tiny_config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.ones_(p)
    return model


@pytest.fixture(scope="session")
def model64(tiny_model):
    """tiny_model in float64: greedy ties cannot flip, so engine outputs must equal the reference."""
    import copy

    return copy.deepcopy(tiny_model).double()


@pytest.fixture(scope="session")
def reference(model64):
    """reference(prompt, n): n greedy tokens of kvlab.generate on model64 (the contiguous-cache
    reference the engine is checked against). Greedy decoding is prefix-consistent, so one longest
    run per prompt answers every shorter request."""
    import kvlab

    runs: dict[tuple, list[int]] = {}

    def ref(prompt, n: int) -> list[int]:
        key = tuple(prompt)
        if len(runs.get(key, ())) < n:
            runs[key] = kvlab.generate(model64, list(prompt), n)
        return runs[key][:n]
    return ref
