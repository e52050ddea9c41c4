"""kvlab.cache.quantized's quantized cache on the fused Triton path against the same cache on the torch
backend, for int8, fp8, int4 and int2: after the same steps both hold the same bytes (codes,
scales, zero points, int4's and int2's residual rows), their attention outputs agree to float
rounding, kvlab.LLM's greedy tokens are equal, and the triton backend never quantizes or
dequantizes in PyTorch.

Under TRITON_INTERPRET=1 (CI) on the CPU with fp32 operands; with --gpu on CUDA.
"""
import copy

import pytest
import torch

pytest.importorskip("triton", reason="Triton is Linux-only; the kernels cannot run here")
from helpers import DEVICE, rel_err

from kvlab import LLM, SamplingParams
from kvlab.attention import paged_triton
from kvlab.cache.paged import AttentionMetadata
from kvlab.cache.quantized import QuantizedPagedKVCache
from kvlab.quant import fp8, int4, int8

FORMATS = ["int8", "fp8", "int4", "int2"]
STORAGE = {"int8": ("k_cache", "v_cache", "k_scale", "v_scale"),
           "fp8": ("k_cache", "v_cache"),
           "int4": ("k_cache", "v_cache", "k_scale", "v_scale", "k_zero", "v_zero")}
STORAGE["int2"] = STORAGE["int4"]
QUANT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8, "int2": torch.uint8}
KIVI = ("int4", "int2")


def caches(fmt, L, NB, bs, Hkv, D, **kw):
    """The same quantized cache on the torch backend and on the triton backend."""
    return [QuantizedPagedKVCache(L, NB, bs, Hkv, D, device=DEVICE, kv_cache_dtype=fmt,
                                  attention_backend=b, **kw) for b in ("torch", "triton")]


def metadata(tables, starts, ends, bs):
    """Sequence s writes positions starts[s]:ends[s] through block table tables[s]."""
    pos = [(s, t) for s, (a, e) in enumerate(zip(starts, ends)) for t in range(a, e)]
    slots = [int(tables[s, t // bs]) * bs + t % bs for s, t in pos]
    qsl = [0]
    for a, e in zip(starts, ends):
        qsl.append(qsl[-1] + e - a)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return AttentionMetadata(slot_mapping=torch.tensor(slots, device=DEVICE),
                             query_start_loc=torch.tensor(qsl, **i32),
                             context_lens=torch.tensor(ends, **i32), block_tables=tables,
                             is_decode=all(e - a == 1 for a, e in zip(starts, ends)))


def assert_same_bytes(fmt, a, b, where):
    for name in STORAGE[fmt]:
        for layer, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name))):
            if x.dtype == torch.float8_e4m3fn:
                x, y = x.view(torch.uint8), y.view(torch.uint8)
            assert torch.equal(x, y), f"{where}: {name}[{layer}] differs"
    pools = ([(a.residual, b.residual)] if fmt in KIVI else []) + \
        ([(a.sinks, b.sinks)] if a.sinks is not None else [])
    for ra, rb in pools:                      # int4's residual rows, the sink rows
        assert torch.equal(ra.res_slot, rb.res_slot) and ra.free == rb.free, where
        for x, y in zip(ra.k_res + ra.v_res, rb.k_res + rb.v_res):
            assert torch.equal(x, y), f"{where}: full-precision rows differ"


@pytest.mark.parametrize("sink", [False, True], ids=["nosink", "sink"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_steps_store_same_bytes(fmt, sink):
    """Two layers, blocks of 4. A packed prefill (6 and 3 tokens: a block filled inside it), 6
    decode steps, then a third prompt prefilled into a freed partial block (9, whose int4 row is
    reused) and a freed sealed one (7), and 2 decode steps: after every step the torch and triton
    caches hold the same bytes, and the layer outputs agree to 1e-5. With `sink`, the first
    blocks (3, 5, then 9) keep their position-0 token in full precision (keep_sink_token).
    Sink rows and int4 first-block scales are checked by assert_same_bytes too."""
    L, NB, bs, Hkv, group, D = 2, 10, 4, 2, 3, 32
    kw = dict(keep_sink_token=sink)
    if fmt == "fp8":  # a per-tensor and a per-head layer, and smoothed keys (stored minus a shift)
        shift = [torch.randn(Hkv, D, generator=torch.Generator().manual_seed(layer)) for layer in range(L)]
        kw["fp8_calibration"] = fp8.Fp8Calibration([torch.tensor(0.02), torch.tensor([0.01, 0.03])],
                                                   [torch.tensor(0.02), torch.tensor([0.01, 0.03])], shift)
    ref, fused = caches(fmt, L, NB, bs, Hkv, D, **kw)
    g = torch.Generator().manual_seed(0)
    t1 = torch.tensor([[3, 7, 1, -1], [5, 0, 9, -1]], dtype=torch.int32, device=DEVICE)
    t2 = torch.tensor([[9, 7, -1]], dtype=torch.int32, device=DEVICE)
    steps = [(t1, [0, 0], [6, 3])] + [(t1, [5 + i, 2 + i], [6 + i, 3 + i]) for i in range(1, 7)]
    steps += [(t2, [0], [6]), (t2, [6], [7]), (t2, [7], [8])]
    for i, (tables, starts, ends) in enumerate(steps):
        m = metadata(tables, starts, ends, bs)
        N = m.slot_mapping.numel()
        for c in (ref, fused):
            c.set_metadata(m)
        for layer in range(L):
            q = torch.randn(1, N, Hkv * group, D, generator=g).to(DEVICE)
            k = (torch.randn(1, N, Hkv, D, generator=g) * torch.linspace(0.2, 3, D)).to(DEVICE)
            v = torch.randn(1, N, Hkv, D, generator=g).to(DEVICE)
            out = [c.attend(layer, q, k, v) for c in (ref, fused)]
            assert rel_err(out[1], out[0].double()) < 1e-5, (i, layer)
        for c in (ref, fused):
            c.end_step()
        assert_same_bytes(fmt, ref, fused, f"step {i}")
    if fmt in KIVI:
        # sealed: 3, 7, 1 and 5, 0 in phase 1; 9 (its old row reused) and 7 again in phase 2,
        # whose 8 tokens fill both blocks: no row stays in use
        assert fused.residual.res_slot.eq(-1).all() and fused.num_residual_blocks == 0
        assert (fused.k_scale[0][[3, 7, 1, 5, 0, 9]] != 0).any(-1).all()
    if sink:                                  # the three first blocks hold a sink row each
        assert fused.sinks.rows_in_use == 3 and (fused.sinks.res_slot[[3, 5, 9]] >= 0).all()


@pytest.mark.parametrize("sink", [False, True], ids=["nosink", "sink"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_llm_greedy_triton_equals_torch(tiny_model, fmt, sink):
    """kvlab.LLM greedy tokens with the fused kernels == with the torch backend, blocks of 8,
    prompts of 21 and 6 tokens in one batch, then a prompt sharing the first one's 16-token
    prefix (a prefix-cache hit: its prefill attends over cached quantized blocks). Layer 0's K/V
    depend on the tokens only, so the two caches hold the same layer-0 bytes at the end."""
    model = copy.deepcopy(tiny_model).to(DEVICE)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (21, 6)]
    later = prompts[0][:16] + torch.randint(0, 256, (3,), generator=g).tolist()
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    runs = {}
    for backend in ("torch", "triton"):
        llm = LLM(model, block_size=8, num_kv_blocks=24, max_model_len=64,
                  attention_backend=backend, kv_cache_dtype=fmt, keep_sink_token=sink)
        first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        second = llm.generate([later], params, use_tqdm=False)[0]
        assert second.num_cached_tokens == 16
        runs[backend] = (first + [second.outputs[0].token_ids], llm)
    assert runs["triton"][0] == runs["torch"][0]
    assert all(len(t) == 4 for t in runs["triton"][0])
    ref, fused = runs["torch"][1].cache, runs["triton"][1].cache
    for name in STORAGE[fmt]:
        x, y = getattr(ref, name)[0], getattr(fused, name)[0]
        if x.dtype == torch.float8_e4m3fn:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), name
    assert (fused.k_cache[0] != 0).any()


def _raise(*args, **kw):
    raise AssertionError("the PyTorch quantizer was called on the fused path")


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_path_never_quantizes_in_pytorch(tiny_model, fmt, monkeypatch):
    """With every PyTorch quantize/dequantize function of kvlab.quant (and the cache's own
    reference write and read) replaced by one that raises, the triton backend still generates,
    and its kernels were handed the quantized caches; the torch backend fails, so the trap works."""
    for mod, names in ((int8, ("quantize_int8", "dequantize_int8")),
                       (fp8, ("quantize_fp8", "dequantize_fp8")),
                       (int4, ("quantize_keys", "quantize_values", "dequantize_keys",
                               "dequantize_values"))):
        for name in names:
            monkeypatch.setattr(mod, name, _raise)
    monkeypatch.setattr(QuantizedPagedKVCache, "write", _raise)
    monkeypatch.setattr(QuantizedPagedKVCache, "dequantize_blocks", _raise)
    seen = []

    def spy(fn, cache_arg):
        def wrapped(*args, **kw):
            seen.append((fn.__name__, args[cache_arg].dtype))
            return fn(*args, **kw)
        return wrapped

    monkeypatch.setattr(paged_triton, "paged_decode_attention_v3", spy(paged_triton.paged_decode_attention_v3, 1))
    monkeypatch.setattr(paged_triton, "_reshape_and_cache", spy(paged_triton._reshape_and_cache, 2))
    model = copy.deepcopy(tiny_model).to(DEVICE)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11]]
    llm = LLM(model, block_size=4, num_kv_blocks=8, max_model_len=32, attention_backend="triton",
              kv_cache_dtype=fmt)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 3 for o in outs)
    L = model.config.num_layers
    assert len(seen) == 2 * 3 * L            # 3 steps (a prefill, 2 decodes): a write and a read
    kinds = {name for name, _ in seen}
    assert kinds == {"paged_decode_attention_v3", "reshape_and_cache"}
    assert {dt for _, dt in seen} == {QUANT_DTYPES[fmt]}
    ref = LLM(model, block_size=4, num_kv_blocks=8, max_model_len=32, kv_cache_dtype=fmt)
    with pytest.raises(AssertionError, match="PyTorch quantizer"):
        ref.generate(prompts, params, use_tqdm=False)


def test_bad_fp8_calibration():
    ones = [torch.tensor(1.0)]
    with pytest.raises(ValueError, match="one scale per layer"):
        QuantizedPagedKVCache(2, 4, 4, 2, 16, kv_cache_dtype="fp8",
                              fp8_calibration=fp8.Fp8Calibration(ones, ones))
    with pytest.raises(ValueError, match=r"shape \[\] or \[2\]"):
        QuantizedPagedKVCache(1, 4, 4, 2, 16, kv_cache_dtype="fp8",
                              fp8_calibration=fp8.Fp8Calibration([torch.ones(3)], ones))
    with pytest.raises(ValueError, match="positive"):
        QuantizedPagedKVCache(1, 4, 4, 2, 16, kv_cache_dtype="fp8",
                              fp8_calibration=fp8.Fp8Calibration([0.0], ones))
    with pytest.raises(ValueError, match=r"k_shift must be finite, of shape \[2, 16\]"):
        QuantizedPagedKVCache(1, 4, 4, 2, 16, kv_cache_dtype="fp8",
                              fp8_calibration=fp8.Fp8Calibration(ones, ones, [torch.zeros(2, 8)]))
    with pytest.raises(ValueError, match="k_shift needs one"):
        QuantizedPagedKVCache(1, 4, 4, 2, 16, kv_cache_dtype="fp8",
                              fp8_calibration=fp8.Fp8Calibration(ones, ones, []))
    with pytest.raises(ValueError, match="only for kv_cache_dtype='fp8'"):
        QuantizedPagedKVCache(1, 4, 4, 2, 16, kv_cache_dtype="int8",
                              fp8_calibration=fp8.Fp8Calibration(ones, ones))
