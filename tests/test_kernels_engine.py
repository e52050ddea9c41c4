"""kvlab.LLM with attention_backend="triton" produces the same greedy tokens as the torch backend
(tiny random model, float32; in the interpreter on CI, on CUDA with --gpu)."""
import copy

import pytest
import torch

pytest.importorskip("triton", reason="Triton is Linux-only; the kernels cannot run here")
from helpers import DEVICE

from kvlab import LLM, SamplingParams


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int4"])
@pytest.mark.parametrize("block_size", [16, 4])
def test_triton_backend_greedy_equals_torch(tiny_model, block_size, kv_cache_dtype):
    """Greedy tokens of the triton backend equal the torch backend's; with the int4 cache the
    kernels write and read the packed blocks themselves (int8 and fp8: test_kernels_quant_engine.py)."""
    model = copy.deepcopy(tiny_model).to(DEVICE)
    g = torch.Generator().manual_seed(block_size)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 19, 1)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(model, block_size=block_size, num_kv_blocks=24, max_model_len=64,
                  attention_backend=backend, kv_cache_dtype=kv_cache_dtype)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if backend == "triton" and kv_cache_dtype == "int4":   # 24 tokens (19 + 6) sealed into blocks
            assert llm.cache.fused
            assert int((llm.cache.k_scale[-1] != 0).any(-1).any(-1).sum()) >= 24 // block_size
    assert tokens["triton"] == tokens["torch"]
    assert all(len(t) == 6 for t in tokens["triton"])


@pytest.mark.parametrize("kv_eviction", ["window", "h2o"])
def test_triton_backend_with_a_kv_budget_equals_torch(tiny_model, kv_eviction):
    """A KV budget's cuts are the cache's copies, not the kernels' business: the triton backend
    reads the compacted blocks and gives the torch backend's tokens."""
    model = copy.deepcopy(tiny_model).to(DEVICE)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (21, 9)]
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(model, block_size=4, num_kv_blocks=24, max_model_len=64, attention_backend=backend,
                  kv_budget_tokens=8, kv_eviction=kv_eviction, enable_prefix_caching=False)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.scheduler.evictor.num_cuts > 0
    assert tokens["triton"] == tokens["torch"]
