"""Chunked prefill: decode stalls and time to first token, whole-prompt prefill against chunks.

Real model (SmolLM2-135M-Instruct, float32), CPU, kvlab.LLM (paged cache, blocks of 16, prefix
caching off so every prompt is computed). Workload, the same for every engine and driven by step
count so it does not depend on this machine's speed:

- `--decoders` short requests (prompts of 32 tokens) are admitted first and decode `--decode-tokens`
  tokens each;
- while they decode, `--long` long prompts of `--long-len` tokens arrive, one every `--gap` steps,
  each asking for 8 tokens.

Per engine the script records the wall time of every step and, for each short request, its
inter-token latencies (time between consecutive tokens; TPOT's distribution): the median, the
95th percentile and the largest, which is the stall a long prompt causes when it is prefilled in one
step. For the long prompts, time to first token (TTFT). Engines: whole-prompt prefill, then chunked
prefill with `max_num_batched_tokens` in `--budgets` (Agrawal et al., 2024, Sarathi-Serve).
Greedy outputs are compared with whole-prompt prefill's (float32: a different split of the same
computation can round differently, so a flip is reported, not hidden).

    python benchmarks/chunked_prefill.py            # full run, writes benchmarks/results/
    python benchmarks/chunked_prefill.py --smoke    # tiny, prints only
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _table import markdown_table

import kvlab
from kvlab.costs.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]


def run(model, tok, prompts_short, prompts_long, a, budget):
    """One engine over the workload: step times, short requests' token times, long requests' TTFT."""
    kw = dict(max_num_batched_tokens=budget, enable_chunked_prefill=True) if budget else {}
    llm = kvlab.LLM((model, tok), block_size=16, max_model_len=2048, max_num_seqs=a.decoders + a.long,
                    enable_prefix_caching=False, **kw)
    llm.generate([prompts_short[0][:8]], kvlab.SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    greedy = dict(temperature=0, ignore_eos=True)
    short_ids = [llm.add_request(p, kvlab.SamplingParams(max_tokens=a.decode_tokens, **greedy))
                 for p in prompts_short]
    token_times = {r: [] for r in short_ids}
    long_ids, added, first, outputs = [], {}, {}, {}
    step, steps = 0, []
    while llm.has_unfinished_requests() or len(long_ids) < a.long:
        if step >= a.first_arrival and (step - a.first_arrival) % a.gap == 0 and len(long_ids) < a.long:
            rid = llm.add_request(prompts_long[len(long_ids)], kvlab.SamplingParams(max_tokens=8, **greedy))
            long_ids.append(rid)
            added[rid] = time.perf_counter()
        t0 = time.perf_counter()
        outs = llm.step()
        now = time.perf_counter()
        steps.append(now - t0)
        for o in outs:
            if o.request_id in token_times:
                token_times[o.request_id].append(now)
            elif o.request_id not in first:
                first[o.request_id] = now
            if o.finished:
                outputs[o.request_id] = o.outputs[0].token_ids
        step += 1
    itl = [b - a_ for ts in token_times.values() for a_, b in zip(ts, ts[1:])]
    itl.sort()
    ttft = [first[r] - added[r] for r in long_ids]
    return {"engine": f"chunked, budget {budget}" if budget else "whole-prompt prefill",
            "max_num_batched_tokens": budget or llm.max_num_batched_tokens, "steps": len(steps),
            "wall_s": sum(steps), "itl_median_ms": 1e3 * statistics.median(itl),
            "itl_p95_ms": 1e3 * itl[int(0.95 * (len(itl) - 1))], "itl_max_ms": 1e3 * itl[-1],
            "ttft_long_median_ms": 1e3 * statistics.median(ttft), "ttft_long_max_ms": 1e3 * max(ttft),
            "outputs": [outputs[r] for r in short_ids + long_ids]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--decoders", type=int, default=8)
    p.add_argument("--decode-tokens", type=int, default=96)
    p.add_argument("--long", type=int, default=3)
    p.add_argument("--long-len", type=int, default=1024)
    p.add_argument("--first-arrival", type=int, default=8)
    p.add_argument("--gap", type=int, default=25)
    p.add_argument("--budgets", type=int, nargs="+", default=[512, 256, 128])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/chunked_prefill")
    a = p.parse_args(argv)
    if a.smoke:
        a.decoders, a.decode_tokens, a.long, a.long_len, a.gap, a.budgets = 2, 12, 1, 96, 4, [32]
    torch.set_num_threads(a.threads)
    model, tok = kvlab.load_model()
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    short = [torch.randint(100, V, (32,), generator=g).tolist() for _ in range(a.decoders)]
    long = [torch.randint(100, V, (a.long_len,), generator=g).tolist() for _ in range(a.long)]
    load_start = os.getloadavg()[0]
    rows = [run(model, tok, short, long, a, b) for b in [None, *a.budgets]]
    base = rows[0]
    for r in rows:
        same = sum(x == y for x, y in zip(r["outputs"], base["outputs"]))
        r["outputs_equal_to_whole"] = f"{same}/{len(base['outputs'])}"
        r["itl_max_vs_whole"] = r["itl_max_ms"] / base["itl_max_ms"]
        r["ttft_long_vs_whole"] = r["ttft_long_median_ms"] / base["ttft_long_median_ms"]
        r["wall_vs_whole"] = r["wall_s"] / base["wall_s"]
    cols = ["engine", "steps", "wall_s", "itl_median_ms", "itl_p95_ms", "itl_max_ms", "itl_max_vs_whole",
            "ttft_long_median_ms", "ttft_long_vs_whole", "wall_vs_whole", "outputs_equal_to_whole"]
    table = markdown_table(rows, cols)
    print(table)
    if a.smoke:
        return rows
    cmd = "python benchmarks/chunked_prefill.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = {"benchmark": "chunked_prefill", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": cmd.strip(), "machine": machine_info(), "model": "SmolLM2-135M-Instruct (float32)",
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
            "rows": [{k: v for k, v in r.items() if k != "outputs"} for r in rows]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    a.out.with_suffix(".md").write_text(
        f"# Chunked prefill on CPU\n\n`{info['command']}` on {info['date']}\n\n"
        f"Machine: {json.dumps(info['machine'])}\n\nLoad average {load_start:.2f} at the start, "
        f"{info['load_average_end']:.2f} at the end.\n\n{table}\n\n"
        "ITL: inter-token latency of the short requests that were decoding when the long prompts "
        "arrived (all their tokens). TTFT: of the long prompts, from add_request to their first token. "
        "Ratios are against whole-prompt prefill in the same run.\n")
    return rows


if __name__ == "__main__":
    main()
