"""The C++ in-place paged attention (kvlab/kernels/cpu/paged_attention.cpp) against the PyTorch
reference (kvlab.attention.paged_torch, which gathers the blocks first).

Float64 on random pools, block tables, group sizes, block sizes and windows (Hypothesis) to 1e-12;
bfloat16/float16 no further from a float64 truth than the reference; the checks that keep a bad
block table from reading outside the pool; and the build itself: where a C++ compiler exists the
kernel must compile, so a broken build fails here instead of silently falling back to the gather.
"""
import math
import shutil

import pytest
import torch
from helpers import random_paged
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.attention import paged_cpu, paged_torch
from kvlab.kernels import cpu as cpu_kernels

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason=f"no CPU kernel: {cpu_kernels.why_unavailable()}")


def test_the_kernel_builds_where_a_compiler_exists():
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine: the gather paths serve")
    assert cpu_kernels.available(), cpu_kernels.why_unavailable()


def _case(lens, qlens, Hkv, G, D, BS, dtype, seed):
    kc, vc, tables, ctx = random_paged(lens, Hkv, D, BS, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), Hkv * G, D, generator=gen).to(dtype)
    return q, kc, vc, tables, qsl, ctx


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(data=st.data(), BS=st.sampled_from([1, 3, 16]), Hkv=st.integers(1, 3), G=st.integers(1, 4),
       D=st.sampled_from([4, 64]), window=st.sampled_from([None, 1, 5, 40]))
def test_prefill_rows_equal_the_reference_float64(data, BS, Hkv, G, D, window):
    """Any mix of query rows per sequence (0, 1, a chunk, the whole context) over its cached context."""
    lens = data.draw(st.lists(st.integers(1, 70), min_size=1, max_size=5))
    qlens = [data.draw(st.integers(0, n)) for n in lens]
    q, kc, vc, tables, qsl, ctx = _case(lens, qlens, Hkv, G, D, BS, torch.float64, seed=len(lens) * 7 + D)
    scale = 1 / math.sqrt(D)
    want = paged_torch.paged_prefill_attention(q, kc, vc, tables, qsl, ctx, scale, sliding_window=window)
    got = cpu_kernels.load().paged_attention(q, kc, vc, tables, qsl, ctx, scale, window or 0)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@needs_kernel
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("Hq,Hkv", [(9, 3), (4, 4), (6, 1)])
def test_backend_decode_uses_the_kernel_and_equals_the_reference(monkeypatch, window, Hq, Hkv):
    calls = []
    real = cpu_kernels.load()
    monkeypatch.setattr(cpu_kernels, "load", lambda: calls.append(1) or real)
    lens = [1, 16, 17, 50]
    q, kc, vc, tables, _, ctx = _case(lens, [1] * 4, Hkv, Hq // Hkv, 64, 16, torch.float64, seed=Hq)
    want = paged_torch.paged_decode_attention(q, kc, vc, tables.long(), ctx, 0.125, sliding_window=window)
    got = paged_cpu.paged_decode_attention(q, kc, vc, tables.long(), ctx, 0.125, sliding_window=window)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert calls, "paged_cpu's decode did not take the in-place kernel"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_the_reference(dtype):
    lens = [40, 3, 129, 300]
    q, kc, vc, tables, qsl, ctx = _case(lens, [1] * 4, 3, 3, 64, 16, torch.float64, seed=5)
    truth = paged_torch.paged_decode_attention(q, kc, vc, tables, ctx, 0.125)
    low = [t.to(dtype) for t in (q, kc, vc)]
    ref = (paged_torch.paged_decode_attention(*low, tables, ctx, 0.125).double() - truth).abs().max().item()
    got = cpu_kernels.load().paged_attention(*low, tables, qsl, ctx, 0.125, 0)
    assert got.dtype == dtype
    err = (got.double() - truth).abs().max().item()
    assert err <= ref + 2 * torch.finfo(dtype).eps * 4, (err, ref)


@needs_kernel
def test_mixed_prefill_step_takes_single_rows_in_place_and_equals_the_reference():
    lens, qlens = [30, 9, 12, 1, 40], [1, 9, 4, 1, 1]
    q, kc, vc, tables, qsl, ctx = _case(lens, qlens, 3, 3, 64, 4, torch.float64, seed=3)
    want = paged_torch.paged_prefill_attention(q, kc, vc, tables, qsl, ctx, 0.125)
    got = paged_cpu.paged_prefill_attention(q, kc, vc, tables, qsl, ctx, 0.125)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@needs_kernel
def test_bad_tables_and_lengths_are_refused_before_any_read():
    q, kc, vc, tables, qsl, ctx = _case([20, 8], [1, 1], 1, 2, 8, 4, torch.float32, seed=1)
    k = cpu_kernels.load()
    bad = tables.clone()
    bad[0, 2] = kc.shape[0]                                     # a block id past the pool
    with pytest.raises(RuntimeError, match="outside the pool"):
        k.paged_attention(q, kc, vc, bad, qsl, ctx, 1.0, 0)
    bad[0, 2] = -1                                              # padding inside the context
    with pytest.raises(RuntimeError, match="outside the pool"):
        k.paged_attention(q, kc, vc, bad, qsl, ctx, 1.0, 0)
    with pytest.raises(RuntimeError, match="exceeds its block table"):
        k.paged_attention(q, kc, vc, tables, qsl, torch.tensor([20, 400], dtype=torch.int32), 1.0, 0)
    with pytest.raises(RuntimeError, match="query rows"):
        k.paged_attention(q, kc, vc, tables, torch.tensor([0, 1, 9], dtype=torch.int32), ctx, 1.0, 0)


def test_other_cache_dtypes_and_strided_pools_take_the_gather_path():
    q = torch.randn(2, 4, 8)
    assert paged_cpu.in_place_kernel(q, torch.zeros(3, 4, 2, 8, dtype=torch.float64)) is None
    assert paged_cpu.in_place_kernel(q, torch.zeros(3, 8, 2, 4).transpose(1, 3)) is None


@needs_kernel
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_share_a_mixed_batch_and_agree_with_the_reference(threads):
    """More threads than one: tasks are handed out longest first; every row still equals the reference."""
    lens = [40, 600, 80, 5, 300, 1, 250, 33]
    q, kc, vc, tables, qsl, ctx = _case(lens, [1] * len(lens), 3, 3, 64, 16, torch.float64, seed=9)
    want = paged_torch.paged_decode_attention(q, kc, vc, tables, ctx, 0.125)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernels.load().paged_attention(q, kc, vc, tables, qsl, ctx, 0.125, 0)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
