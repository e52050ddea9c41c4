"""Paged decode attention kernels v1, v2, v3 against float64 attention over the gathered cache.

Under TRITON_INTERPRET=1 (CI) they run on the CPU with fp32/fp16 operands; with --gpu on CUDA.
Context lengths 1, BS - 1, BS and a few hundred are mixed in one batch; outputs are poisoned with
NaN before each launch, so an element a kernel forgets to write fails the test.
"""
import pytest
import torch

pytest.importorskip("triton", reason="Triton is Linux-only; the kernels cannot run here")
from helpers import DEVICE, random_paged, reference_decode, rel_err, scale_for

from kvlab.kernels.decode_attention_v1 import paged_decode_attention_v1
from kvlab.kernels.decode_attention_v2 import paged_decode_attention_v2
from kvlab.kernels.decode_attention_v3 import paged_decode_attention_v3

BS = 16
LENS = [1, BS - 1, BS, 300]
KERNELS = {1: paged_decode_attention_v1, 2: paged_decode_attention_v2, 3: paged_decode_attention_v3}
# fp32: exact up to summation order ("ieee" dots); fp16 operands: about 1e-3.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


def run(version, q, k, v, bt, ctx, **kw):
    out = torch.full_like(q, float("nan"))
    return KERNELS[version](q, k, v, bt, ctx, scale_for(q.shape[-1]), out=out, **kw)


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("D", [64, 128])
def test_decode_matches_reference(version, group, D):
    Hkv = 2
    k, v, bt, ctx = random_paged(LENS, Hkv, D, BS, seed=version * 100 + group * 10 + D)
    q = torch.randn(len(LENS), Hkv * group, D, device=DEVICE)
    out = run(version, q, k, v, bt, ctx)
    assert rel_err(out, reference_decode(q, k, v, bt, ctx)) < TOL[torch.float32]


@pytest.mark.parametrize("version", [2, 3])
def test_decode_fp16(version):
    k, v, bt, ctx = random_paged(LENS, 2, 64, BS, dtype=torch.float16, seed=7)
    q = torch.randn(len(LENS), 8, 64, device=DEVICE).half()
    out = run(version, q, k, v, bt, ctx)
    assert out.dtype == torch.float16
    assert rel_err(out, reference_decode(q, k, v, bt, ctx)) < TOL[torch.float16]


def test_v3_partitions_and_odd_block_size():
    """Many partitions (partition 64 tokens, some empty for short sequences) and a block size that
    is not a power of two: tiles then straddle blocks."""
    lens = [1, 11, 12, 250, 97]
    k, v, bt, ctx = random_paged(lens, 1, 64, 12, seed=3)
    q = torch.randn(len(lens), 4, 64, device=DEVICE)
    ref = reference_decode(q, k, v, bt, ctx)
    for part in (64, 128):
        out = run(3, q, k, v, bt, ctx, partition_size=part)
        assert rel_err(out, ref) < TOL[torch.float32]


def test_decode_rejects_bad_inputs():
    k, v, bt, ctx = random_paged([5, 20], 2, 64, BS)
    q = torch.randn(2, 4, 64, device=DEVICE)
    s = scale_for(64)
    with pytest.raises(TypeError, match="block_tables"):
        paged_decode_attention_v2(q, k, v, bt.long(), ctx, s)
    with pytest.raises(TypeError, match="k_cache dtype"):
        paged_decode_attention_v3(q.half(), k, v, bt, ctx, s)
    with pytest.raises(ValueError, match="contiguous"):
        paged_decode_attention_v1(q.transpose(0, 1).contiguous().transpose(0, 1), k, v, bt, ctx, s)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode_attention_v2(torch.randn(2, 3, 64, device=DEVICE), k, v, bt, ctx, s)
    with pytest.raises(ValueError, match="head dim"):
        paged_decode_attention_v1(torch.randn(2, 4, 48, device=DEVICE), k[..., :48].contiguous(),
                                  v[..., :48].contiguous(), bt, ctx, s)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention_v3(q, k, v, bt, ctx[:1], s)
    with pytest.raises(ValueError, match="partition_size"):
        paged_decode_attention_v3(q, k, v, bt, ctx, s, partition_size=100)
