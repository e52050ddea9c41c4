"""Where one engine step's time goes on the CPU: torch.profiler over one decode step (batch 1 and
a batch of 16) and one prefill of kvlab.LLM on the real model, top operators by self CPU time.

    python benchmarks/profile_step.py --threads 2 [--dtype bfloat16] [--variant reference|packed|fast]

The variants are engine_cpu.py's: reference (the chapters' Llama, torch attention), packed
(FastLlama without prepacking, torch attention: the fast path before its second round), fast
(prepacked FastLlama on the cpu attention backend; `--fast` is short for it).

Prints the tables; the results notes (benchmarks/results/engine_cpu_vllm_notes.md) quote them.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--variant", default="reference", choices=["reference", "packed", "fast"])
    ap.add_argument("--fast", action="store_true", help="--variant fast")
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    import kvlab
    from kvlab import SamplingParams

    dtype = getattr(torch, args.dtype)
    model, tok = kvlab.load_model(dtype=dtype)
    variant = "fast" if args.fast else args.variant
    if variant != "reference":
        from kvlab.model.fast import FastLlama

        model = FastLlama.from_llama(model, prepack=variant == "fast")
    llm = kvlab.LLM((model, tok), max_model_len=1024, enable_prefix_caching=False,
                    attention_backend="cpu" if variant == "fast" else "torch")
    ids = tok.encode("The history of computing is a story of layers. " * 40)
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} threads, {args.dtype}, variant {variant}")

    def prof(label, fn, reps=3):
        fn()  # warm
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        wall = (time.perf_counter() - t) / reps
        with profile(activities=[ProfilerActivity.CPU]) as p:
            fn()
        print(f"\n## {label}: {wall * 1e3:.1f} ms per call (median-free mean of {reps})")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))

    for batch, ctx in ((1, 80), (16, 300)):
        rids = [llm.add_request(ids[i:i + ctx], SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True))
                for i in range(batch)]
        started = set()
        while len(started) < batch:     # every prefill (several steps under the token budget)
            started |= {o.request_id for o in llm.step()}
        prof(f"decode step, batch {batch}, context {ctx}", llm.step)
        llm.abort_request(rids)

    def prefill():
        rid = llm.add_request(ids[:256], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        llm.step()
        llm.abort_request(rid)
    prof("prefill, one 256-token prompt", prefill)


if __name__ == "__main__":
    main()
