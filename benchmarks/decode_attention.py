# ruff: noqa: B023  (each lambda is timed inside the loop iteration that defines it)
"""Paged decode attention on a CUDA GPU: kvlab's Triton kernels against PyTorch.

    PYTHONPATH=. python benchmarks/decode_attention.py [--quick] [--out benchmarks/results/decode_attention]

Llama-3-8B's head layout (32 query heads, 8 KV heads, head dim 128), one decode query per sequence,
every sequence `ctx` tokens long, blocks of 16 tokens scattered at random over the pool. For each
batch x context it times, with triton.testing.do_bench (median; L2 flushed between repeats):

  kvlab v3 (split-K) on bf16, int8, fp8, int4 and int2 caches, v1, v2 on bf16 (kvlab.kernels)
  SDPA on a contiguous [B, Hkv, ctx, D] cache                            (F.scaled_dot_product_attention)
  FlexAttention over a paged cache (128-token pages)                     (where this torch has it)
  the PyTorch gather reference                                           (kvlab.attention.paged_torch)

Achieved bandwidth counts the bytes that must be read once: K and V of every context token (plus
int8 scales; int4 / int2 codes, scales, zeros and each sequence's full-precision residual block), q
and the output. The int4 and int2 caches (KIVI layout, kvlab/kernels/reshape_and_cache_int4.py)
hold random codes and scales, with each sequence's last block in the bf16 residual pool as during a
real decode step; their outputs are checked against the gather reference over the cache
kvlab.quant.int4 dequantizes. The device-to-device copy bandwidth, measured in the same run
(bytes read + bytes written), is the practical ceiling. Results: <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from kvlab.attention import paged_torch
from kvlab.kernels.decode_attention_v1 import paged_decode_attention_v1
from kvlab.kernels.decode_attention_v2 import paged_decode_attention_v2
from kvlab.kernels.decode_attention_v3 import paged_decode_attention_v3

HQ, HKV, D, BS = 32, 8, 128, 16
BATCHES = (1, 8, 32, 64, 128)
CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
MAX_TOKENS = 2 * 1024 * 1024        # B * ctx cap: a bf16 K+V copy is then 8.6 GB
GATHER_MAX_TOKENS = 512 * 1024      # the gather reference materializes a second copy
FLEX_CONTEXTS = (4096, 16384)       # each FlexAttention shape is compiled once: keep them few
TUNE = [(32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 4, 2), (128, 8, 3)]


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")   # milliseconds


def copy_bandwidth():
    src = torch.randn(512 * 1024 * 1024, device="cuda", dtype=torch.bfloat16)   # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6          # GB/s


def make_cache(B, ctx, g):
    NB = B * ctx // BS
    perm = torch.randperm(NB, device="cuda", generator=g).to(torch.int32)
    bt = perm.view(B, ctx // BS).contiguous()
    k = torch.randn(NB, BS, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(NB, BS, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return k, v, bt


def int8_cache(k, g):
    q = torch.randint(-127, 128, k.shape, device="cuda", dtype=torch.int8, generator=g)
    s = (torch.rand(k.shape[:3], device="cuda", generator=g) * 0.02 + 0.01).half()
    return q, s


def fp8_cache(k):
    return (k * 0.5).to(torch.float8_e4m3fn), torch.ones(HKV, device="cuda")


def int4_cache(bt, g, bits=4):
    """Random int4 (bits=2: int2) codes, scales and zeros for NB blocks; each sequence's last block
    (the one a decode step writes) in the bf16 residual pool. Returns (k_codes, v_codes, k_scale,
    v_scale, kwargs, bytes)."""
    NB, B = bt.numel(), bt.shape[0]
    kw = dict(device="cuda", generator=g)
    codes = [torch.randint(0, 256, (NB, BS, HKV, D * bits // 8), dtype=torch.uint8, **kw) for _ in "kv"]
    ks = (torch.rand(NB, HKV, D, **kw) * 0.2 + 0.05).half()
    vs = (torch.rand(NB, BS, HKV, D // 32, **kw) * 0.2 + 0.05).half()
    res_slot = torch.full((NB,), -1, device="cuda", dtype=torch.int32)
    res_slot[bt[:, -1].long()] = torch.arange(B, device="cuda", dtype=torch.int32)
    res = [torch.randn(B, BS, HKV, D, dtype=torch.bfloat16, **kw) for _ in "kv"]
    mid = -((1 << bits) - 1) / 2                     # zero = -(levels / 2) * scale: codes centred on 0
    args = dict(k_zero=(mid * ks).half(), v_zero=(mid * vs).half(), k_res=res[0], v_res=res[1],
                res_slot=res_slot)
    nbytes = 2 * codes[0].numel() + 2 * (ks.numel() + vs.numel()) * 2 + NB * 4
    return codes[0], codes[1], ks, vs, args, nbytes


def int4_reference_error(q, bt, ctx, scale, g, bits=4):
    """v3 on a random int4 (int2) cache against the gather reference over kvlab.quant.int4's
    dequantization."""
    from kvlab.quant import int4
    kc, vc, ks, vs, a, _ = int4_cache(bt, g, bits)
    kd = int4.dequantize_keys(kc, ks, a["k_zero"], torch.bfloat16, bits)
    vd = int4.dequantize_values(vc, vs, a["v_zero"], torch.bfloat16, bits)
    rows = a["res_slot"] >= 0
    kd[rows], vd[rows] = a["k_res"][a["res_slot"][rows].long()], a["v_res"][a["res_slot"][rows].long()]
    ref = paged_torch.paged_decode_attention(q, kd, vd, bt, ctx, scale)
    out = paged_decode_attention_v3(q, kc, vc, bt, ctx, scale, ks, vs, **a)
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def flex_setup(kc, vc, B, ctx):
    """FlexAttention's paged form (what torch's PagedAttention builds): one pool [1, Hkv, pages * 128,
    D] holding every sequence's 128-token pages in a random order, and a BlockMask whose KV block
    indices are each sequence's physical pages. `kc`, `vc` [B, Hkv, ctx, D] are the logical contents
    (the SDPA cache), so flex must reproduce SDPA's output, which the caller checks."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    P = 128
    pages, per_seq = B * ctx // P, ctx // P
    perm = torch.randperm(pages, device="cuda")
    kf = torch.empty(HKV, pages, P, D, device="cuda", dtype=kc.dtype)
    vf = torch.empty_like(kf)
    kf[:, perm] = kc.view(B, HKV, per_seq, P, D).transpose(0, 1).reshape(HKV, pages, P, D)
    vf[:, perm] = vc.view(B, HKV, per_seq, P, D).transpose(0, 1).reshape(HKV, pages, P, D)
    kf, vf = kf.view(1, HKV, pages * P, D), vf.view(1, HKV, pages * P, D)
    # kv indices are padded to the pool's page count, as convert_logical_block_mask does
    table = torch.zeros(B, 1, 1, pages, device="cuda", dtype=torch.int32)
    table[..., :per_seq] = perm.view(B, 1, 1, per_seq).to(torch.int32)
    owner = torch.zeros(B, pages, device="cuda", dtype=torch.bool)
    owner.scatter_(1, perm.view(B, per_seq), True)
    full = torch.full((B, 1, 1), per_seq, device="cuda", dtype=torch.int32)
    none = torch.zeros((B, 1, 1), device="cuda", dtype=torch.int32)
    mask = BlockMask.from_kv_blocks(none, table, full, table, BLOCK_SIZE=(P, P),
                                    mask_mod=lambda b, h, q, kv: owner[b, kv // P],
                                    seq_lengths=(1, pages * P))
    torch._dynamo.config.recompile_limit = 64      # one compile per (batch, context) shape
    fn = torch.compile(flex_attention, dynamic=False)
    return lambda q4: fn(q4, kf, vf, block_mask=mask, enable_gqa=True, scale=1.0 / math.sqrt(D))


def run(args):
    g = torch.Generator(device="cuda").manual_seed(0)
    scale = 1.0 / math.sqrt(D)
    rows, notes = [], []
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw:.0f} GB/s")

    # a small tuning sweep for v3 at one mid-size point, per cache format; the winner is used below
    k, v, bt = make_cache(32, 8192, g)
    q = torch.randn(32, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    ctx = torch.full((32,), 8192, device="cuda", dtype=torch.int32)
    k8, ks8 = int8_cache(k, g)
    v8, vs8 = int8_cache(v, g)
    kf8, sf8 = fp8_cache(k)
    vf8, _ = fp8_cache(v)
    k4, v4, ks4, vs4, a4, _ = int4_cache(bt, g)
    k2, v2, ks2, vs2, a2, _ = int4_cache(bt, g, bits=2)
    caches = {"bf16": (k, v, None, None, {}), "int8": (k8, v8, ks8, vs8, {}),
              "fp8": (kf8, vf8, sf8, sf8, {}), "int4": (k4, v4, ks4, vs4, a4),
              "int2": (k2, v2, ks2, vs2, a2)}
    best = {}
    for fmt, (kc, vc, ks, vs, extra) in caches.items():
        t = {}
        for cfg in TUNE:
            bn, w, st = cfg
            t[cfg] = bench(lambda: paged_decode_attention_v3(q, kc, vc, bt, ctx, scale, ks, vs,
                                                             block_n=bn, num_warps=w, num_stages=st,
                                                             **extra))
        best[fmt] = min(t, key=t.get)
        notes.append(f"tune {fmt} (B=32, ctx=8192): " +
                     ", ".join(f"{c}: {ms * 1e3:.0f} us" for c, ms in t.items()))
        print(notes[-1])
    # correctness on the real layout, against the gather reference
    ref = paged_torch.paged_decode_attention(q, k, v, bt, ctx, scale)
    out = paged_decode_attention_v3(q, k, v, bt, ctx, scale)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    notes.append(f"v3 bf16 vs gather reference at B=32, ctx=8192: relative error {err:.2e}")
    print(notes[-1])
    k4 = v4 = ks4 = vs4 = a4 = k2 = v2 = ks2 = vs2 = a2 = None
    for bits in (4, 2):
        err = int4_reference_error(q, bt, ctx, scale, g, bits)
        notes.append(f"v3 int{bits} vs gather reference over kvlab.quant.int4's dequantization at "
                     f"B=32, ctx=8192: relative error {err:.2e}")
        print(notes[-1])
    k = v = k8 = v8 = kf8 = vf8 = caches = None   # free the memory before the next configuration
    torch.cuda.empty_cache()

    batches = (1, 32) if args.quick else BATCHES
    contexts = (1024, 16384) if args.quick else CONTEXTS
    for B in batches:
        for L in contexts:
            if B * L > MAX_TOKENS:
                continue
            k, v, bt = make_cache(B, L, g)
            q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
            q4 = q.view(B, HQ, 1, D)
            ctx = torch.full((B,), L, device="cuda", dtype=torch.int32)
            kv_bytes = B * L * HKV * D * 2 * 2
            io = 2 * B * HQ * D * 2
            res = {}

            def v3(kc, vc, ks, vs, fmt, **extra):
                bn, w, st = best[fmt]
                return lambda: paged_decode_attention_v3(q, kc, vc, bt, ctx, scale, ks, vs,
                                                         block_n=bn, num_warps=w, num_stages=st,
                                                         **extra)
            res["kvlab_v3_bf16"] = (bench(v3(k, v, None, None, "bf16")), kv_bytes + io)
            res["kvlab_v2_bf16"] = (bench(lambda: paged_decode_attention_v2(q, k, v, bt, ctx, scale)),
                                    kv_bytes + io)
            res["kvlab_v1_bf16"] = (bench(lambda: paged_decode_attention_v1(q, k, v, bt, ctx, scale)),
                                    kv_bytes + io)
            k8, ks8 = int8_cache(k, g)
            v8, vs8 = int8_cache(v, g)
            res["kvlab_v3_int8"] = (bench(v3(k8, v8, ks8, vs8, "int8")),
                                    kv_bytes // 2 + B * L * HKV * 2 * 2 + io)
            k8 = v8 = ks8 = vs8 = None   # free the memory before the next configuration
            kf8, sf8 = fp8_cache(k)
            vf8, _ = fp8_cache(v)
            res["kvlab_v3_fp8"] = (bench(v3(kf8, vf8, sf8, sf8, "fp8")), kv_bytes // 2 + io)
            kf8 = vf8 = None   # free the memory before the next configuration
            k4, v4, ks4, vs4, a4, b4 = int4_cache(bt, g)
            res["kvlab_v3_int4"] = (bench(v3(k4, v4, ks4, vs4, "int4", **a4)),
                                    b4 + 2 * B * BS * HKV * D * 2 + io)   # + residual blocks
            k4 = v4 = ks4 = vs4 = a4 = None   # free the memory before the next configuration
            k2, v2, ks2, vs2, a2, b2 = int4_cache(bt, g, bits=2)
            res["kvlab_v3_int2"] = (bench(v3(k2, v2, ks2, vs2, "int2", **a2)),
                                    b2 + 2 * B * BS * HKV * D * 2 + io)   # + residual blocks
            k2 = v2 = ks2 = vs2 = a2 = None   # free the memory before the next configuration
            kc = k.view(B, L, HKV, D).transpose(1, 2).contiguous()     # SDPA's contiguous cache
            vc = v.view(B, L, HKV, D).transpose(1, 2).contiguous()
            res["sdpa_contiguous_bf16"] = (bench(lambda: F.scaled_dot_product_attention(
                q4, kc, vc, scale=scale, enable_gqa=True)), kv_bytes + io)
            if L in FLEX_CONTEXTS and not args.no_flex:
                try:
                    fn = flex_setup(kc, vc, B, L)
                    want = F.scaled_dot_product_attention(q4, kc, vc, scale=scale, enable_gqa=True)
                    err = ((fn(q4).float() - want.float()).norm() / want.float().norm()).item()
                    notes.append(f"FlexAttention paged vs SDPA at B={B}, ctx={L}: relative error {err:.1e}")
                    res["flex_paged_bf16"] = (bench(lambda: fn(q4)), kv_bytes + io)
                    fn = None   # free the memory before the next configuration
                except Exception as e:  # an older torch, or a shape flex cannot compile
                    notes.append(f"FlexAttention failed at B={B}, ctx={L}: {type(e).__name__}: {e}"[:300])
                    print(notes[-1])
            kc = vc = None   # free the memory before the next configuration
            if B * L <= GATHER_MAX_TOKENS:
                res["torch_gather_bf16"] = (bench(lambda: paged_torch.paged_decode_attention(
                    q, k, v, bt, ctx, scale)), kv_bytes + io)
            for name, (ms, nbytes) in res.items():
                gbs = nbytes / ms / 1e6
                rows.append(dict(batch=B, context=L, impl=name, ms=ms, GBps=gbs,
                                 pct_copy=100 * gbs / bw))
            print(f"B={B:4d} ctx={L:6d} " + "  ".join(f"{n}={ms * 1e3:.0f}us" for n, (ms, _) in res.items()),
                  flush=True)
            k = v = bt = None   # free the memory before the next configuration
            torch.cuda.empty_cache()
    return bw, best, rows, notes


def environment():
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        driver = "unknown"
    return dict(gpu=torch.cuda.get_device_name(), driver=driver, torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="PYTHONPATH=. python " + " ".join(sys.argv))


def write(out, env, bw, best, rows, notes):
    with open(out + ".json", "w") as f:
        json.dump(dict(environment=env, copy_GBps=bw, tuned={k: list(v) for k, v in best.items()},
                       layout=dict(Hq=HQ, Hkv=HKV, D=D, block_size=BS), rows=rows, notes=notes), f,
                  indent=1)
    impls = sorted({r["impl"] for r in rows})
    lines = [f"# Paged decode attention, {env['gpu']}", "",
             f"{env['date']}; driver {env['driver']}; torch {env['torch']}; triton {env['triton']}; "
             f"CUDA {env['cuda']}", f"Command: `{env['command']}`", "",
             f"Llama-3-8B heads (Hq={HQ}, Hkv={HKV}, D={D}), block size {BS}, one decode query per "
             f"sequence. Device-to-device copy bandwidth measured in the same run: **{bw:.0f} GB/s**. "
             "Times are medians of triton.testing.do_bench; GB/s counts the K/V bytes (and scales) read "
             "once plus q and out; % is of the copy bandwidth.", "",
             "| batch | context | impl | time (us) | GB/s | % copy |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['context']} | {r['impl']} | {r['ms'] * 1e3:.1f} | "
                     f"{r['GBps']:.0f} | {r['pct_copy']:.0f} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))
    print(f"implementations: {impls}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/decode_attention")
    p.add_argument("--quick", action="store_true", help="two batches x two contexts")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode_attention.py needs a CUDA GPU (the kernels' CPU interpreter is "
                 "~1000x slower and its timings mean nothing)")
    t0 = time.time()
    bw, best, rows, notes = run(args)
    notes.append(f"Sweep wall time {time.time() - t0:.0f} s.")
    write(args.out, environment(), bw, best, rows, notes)


if __name__ == "__main__":
    main()
