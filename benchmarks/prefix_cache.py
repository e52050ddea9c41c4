"""Automatic prefix caching: time to first token with a shared system prompt, caching on vs off.

Real model (SmolLM2-135M-Instruct, float32), CPU, kvlab.LLM with the paged cache (block size 16).
Workload: a 1,000-token system prompt shared by 32 requests, each ending in its own 64-token
question (token ids cut from a fixed text, so the lengths are exact). The requests arrive one after
the other, each asking for one token, so time to first token (TTFT) is the prefill of that request
alone. Request 0 fills the cache; the table reports the median TTFT of requests 1..31.

The same requests run on two engines, prefix caching on and off, in one process. Every forward
pass is counted (tokens the model actually ran on): with caching on, the tokens saved must equal
the prefix-cache hits, and the first output tokens must be identical.

A second table sweeps the shared-prefix length (4 later requests each) for chapter 08's figure.

    python benchmarks/prefix_cache.py            # the full run (a few minutes on 2 busy cores)
    python benchmarks/prefix_cache.py --smoke    # tiny sizes, to check it runs

Results: benchmarks/results/prefix_cache.json and .md (machine, date, versions, command, load).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("A key-value cache keeps the keys and values of every token a model has already seen, so "
        "each new token attends over them instead of recomputing the whole prefix. Serving systems "
        "see the same system prompt, the same few-shot examples and the same chat history again and "
        "again; computing their keys and values once and sharing them is the point of prefix "
        "caching. The rest of this text is filler of the ordinary kind: notes on rivers, bridges, "
        "harbours, lighthouses, orchards, libraries, railways, observatories and markets, written "
        "to give every question a different opening and every prompt a realistic length. ")


def token_pool(tok, n):
    ids = tok.encode(TEXT)
    return (ids * (n // len(ids) + 2))[:n]


def make_requests(tok, prefix_len, question_len, num, seed=0):
    """(system prompt, [questions]): different slices of a rotated text, exact lengths."""
    pool = token_pool(tok, 4096)
    system = token_pool(tok, prefix_len) if prefix_len else []
    g = torch.Generator().manual_seed(seed)
    questions = []
    for _ in range(num):
        start = int(torch.randint(0, len(pool) - question_len, (1,), generator=g))
        q = pool[start:start + question_len]
        q[0] = 1000 + len(questions)                 # a distinct first token: no two questions share
        questions.append(q)
    return system, questions


def counting_engine(model, tok, caching, block_size):
    import kvlab

    llm = kvlab.LLM((model, tok), block_size=block_size, num_kv_blocks=1024, max_model_len=2048,
                    enable_prefix_caching=caching)
    llm.computed = 0
    prepare = llm.runner.prepare

    def counting(seqs):
        out = prepare(seqs)
        llm.computed += out[0].shape[1]
        return out
    llm.runner.prepare = counting
    return llm


def run_sequential(llm, prompts):
    """One request at a time, one output token each -> (TTFTs in seconds, first tokens, cached)."""
    import kvlab

    params = kvlab.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    ttft, first, cached = [], [], []
    for p in prompts:
        out = llm.generate([p], params, use_tqdm=False)[0]
        ttft.append(out.first_token_time - out.arrival_time)
        first.append(out.outputs[0].token_ids[0])
        cached.append(out.num_cached_tokens)
    return ttft, first, cached


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a check that it runs)")
    ap.add_argument("--prefix-len", type=int, default=1000)
    ap.add_argument("--question-len", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--sweep", default="0,128,256,512,1000", help="shared-prefix lengths of the sweep")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared, oversubscribed CPU more threads only add waiting)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "prefix_cache"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.prefix_len, args.question_len, args.num_requests, args.sweep = 96, 16, 4, "0,64"

    import kvlab
    from kvlab.costs.machine import machine_info

    model, tok = kvlab.load_model()
    load_start = os.getloadavg()[0]
    system, questions = make_requests(tok, args.prefix_len, args.question_len, args.num_requests)
    prompts = [system + q for q in questions]
    on = counting_engine(model, tok, True, args.block_size)
    off = counting_engine(model, tok, False, args.block_size)
    for llm in (on, off):                              # warm-up on unrelated tokens
        run_sequential(llm, [[7] * 32])
        llm.block_manager.reset_prefix_cache()
        llm.computed = 0
    q0, h0 = on.block_manager.prefix_cache_queries, on.block_manager.prefix_cache_hits

    # interleave the engines request by request, so both see the same machine load
    res = {True: ([], [], []), False: ([], [], [])}
    for p in prompts:
        for caching, llm in ((True, on), (False, off)):
            t, f, c = run_sequential(llm, [p])
            for acc, v in zip(res[caching], (t, f, c)):
                acc += v
    (t_on, f_on, c_on), (t_off, f_off, _) = res[True], res[False]
    hits = on.block_manager.prefix_cache_hits - h0
    queries = on.block_manager.prefix_cache_queries - q0
    med_on, med_off = statistics.median(t_on[1:]), statistics.median(t_off[1:])
    cut = 1 - med_on / med_off
    comp_off, comp_on = off.computed, on.computed      # the sweep below adds to the counters
    checks = dict(identical_first_tokens=f_on == f_off, tokens_saved=comp_off - comp_on,
                  prefix_cache_hits=hits, prefix_cache_queries=queries,
                  saved_equals_hits=comp_off - comp_on == hits,
                  cached_tokens_per_later_request=sorted(set(c_on[1:])))

    print(f"\nPrefix caching, SmolLM2-135M fp32, CPU ({torch.get_num_threads()} threads), block size "
          f"{args.block_size}; load average at start {load_start:.2f}")
    print(f"{args.prefix_len}-token shared system prompt + {args.num_requests} x {args.question_len}-token "
          "questions, one request at a time, 1 output token each\n")
    hdr = f"{'':24s} {'caching off':>12s} {'caching on':>12s}"
    print(hdr + "\n" + "-" * len(hdr))
    print(f"{'TTFT request 0 (ms)':24s} {t_off[0] * 1e3:12.1f} {t_on[0] * 1e3:12.1f}")
    print(f"{'TTFT later, median (ms)':24s} {med_off * 1e3:12.1f} {med_on * 1e3:12.1f}")
    print(f"{'tokens computed':24s} {off.computed:12d} {on.computed:12d}")
    print(f"TTFT of the later requests cut by {cut * 100:.1f} % (goal >= 85 %); tokens saved "
          f"{off.computed - on.computed} = prefix-cache hits {hits}: {checks['saved_equals_hits']}; "
          f"hit rate {hits / queries * 100:.1f} %; identical first tokens: {checks['identical_first_tokens']}")

    sweep = []
    print(f"\n{'shared prefix':>13s} {'TTFT off (ms)':>14s} {'TTFT on (ms)':>13s} {'cut':>7s}")
    for L in [int(x) for x in args.sweep.split(",")]:
        system, qs = make_requests(tok, L, args.question_len, 5, seed=1 + L)
        for llm in (on, off):
            llm.block_manager.reset_prefix_cache()
        row = {}
        for caching, llm in ((True, on), (False, off)):
            row[caching] = run_sequential(llm, [system + q for q in qs])[0][1:]
        m_on, m_off = statistics.median(row[True]), statistics.median(row[False])
        sweep.append(dict(shared_prefix_tokens=L, question_tokens=args.question_len,
                          ttft_off_ms=round(m_off * 1e3, 2), ttft_on_ms=round(m_on * 1e3, 2),
                          cut=round(1 - m_on / m_off, 4)))
        print(f"{L:13d} {m_off * 1e3:14.1f} {m_on * 1e3:13.1f} {(1 - m_on / m_off) * 100:6.1f}%")

    record = dict(
        benchmark="prefix_cache",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        machine=machine_info(), load_average_start=load_start, load_average_end=os.getloadavg()[0],
        torch_threads=torch.get_num_threads(),
        versions=dict(torch=torch.__version__, kvlab=kvlab.__version__),
        workload=dict(prefix_len=args.prefix_len, question_len=args.question_len,
                      num_requests=args.num_requests, block_size=args.block_size, max_tokens=1,
                      arrival="sequential, engines interleaved request by request", greedy=True),
        results=dict(ttft_request0_off_ms=round(t_off[0] * 1e3, 2), ttft_request0_on_ms=round(t_on[0] * 1e3, 2),
                     ttft_later_median_off_ms=round(med_off * 1e3, 2),
                     ttft_later_median_on_ms=round(med_on * 1e3, 2), ttft_cut=round(cut, 4),
                     ttft_later_off_ms=[round(t * 1e3, 2) for t in t_off[1:]],
                     ttft_later_on_ms=[round(t * 1e3, 2) for t in t_on[1:]],
                     tokens_computed_off=comp_off, tokens_computed_on=comp_on),
        checks=checks, sweep=sweep, goal="TTFT of later requests cut by >= 85 %", smoke=args.smoke)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(record, f, indent=2, default=str)
    with open(args.out + ".md", "w") as f:
        f.write(f"# prefix_cache: time to first token with a shared system prompt\n\n`{record['command']}`, "
                f"{record['date']}, {record['machine'].get('cpu')}, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads, load average {load_start:.2f} at start (shared machine: "
                "compare the ratio, not absolutes).\n\n"
                f"{args.prefix_len}-token system prompt + {args.num_requests} x {args.question_len}-token "
                f"questions, one at a time, 1 output token, block size {args.block_size}.\n\n"
                "| | caching off | caching on |\n|---|---|---|\n"
                f"| TTFT request 0 (ms) | {t_off[0] * 1e3:.1f} | {t_on[0] * 1e3:.1f} |\n"
                f"| TTFT later requests, median (ms) | {med_off * 1e3:.1f} | {med_on * 1e3:.1f} |\n"
                f"| tokens computed | {comp_off} | {comp_on} |\n\n"
                f"TTFT of the later requests cut by **{cut * 100:.1f} %** (goal >= 85 %). Tokens saved "
                f"{comp_off - comp_on}, prefix-cache hits {hits} (equal: {checks['saved_equals_hits']}); "
                f"identical first tokens: {checks['identical_first_tokens']}.\n\n"
                "| shared prefix | TTFT off (ms) | TTFT on (ms) | cut |\n|---|---|---|---|\n")
        for r in sweep:
            f.write(f"| {r['shared_prefix_tokens']} | {r['ttft_off_ms']} | {r['ttft_on_ms']} | "
                    f"{r['cut'] * 100:.1f} % |\n")
    print(f"wrote {args.out}.json and .md")
    return record


if __name__ == "__main__":
    main()
