"""KV eviction in the engine on the real model: decode throughput, memory per sequence and greedy
agreement of each policy against the full cache, at long context.

    python benchmarks/kv_eviction_engine.py             # full run, writes benchmarks/results/kv_eviction_engine.*
    python benchmarks/kv_eviction_engine.py --smoke     # tiny run, prints only

`kvlab.LLM(kv_budget_tokens=B, kv_eviction=policy)` on SmolLM2-135M-Instruct, float32, CPU, greedy,
`ignore_eos`, prefix caching off (h2o and snapkv refuse it; the prompts share nothing anyway).
`--sequences` prompts of `--prompt-tokens` tokens from the course corpus (data/pydoc_windows.jsonl)
run together, `--max-tokens` tokens each. Per configuration:

- decode throughput: tokens produced by the steps after every sequence has its first token, over
  those steps' wall time (the prefill is the same for every policy: a prompt is prefilled whole);
- memory per sequence: the most blocks one decoding sequence held, times the bytes of a block
  (all layers, K and V; h2o and snapkv add 4 bytes per entry, KV head and layer for the scores);
- greedy agreement with the full cache: the fraction of equal positions, and the tokens before the
  first difference (mean over sequences).

`--rounds` alternating rounds (full cache, then every policy and budget); the table gives the median
throughput. `--variant fast` (default) is the engine's fast path (prepacked FastLlama on the cpu
attention backend), `reference` the readable Llama on the torch backend. The perplexity of each
policy is benchmarks/kv_eviction.py's (the accuracy twin, tested equal to the engine's tokens in
tests/test_evict_engine.py when it cuts as the engine does).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _results import run_info, write_results
from _table import markdown_table

import kvlab

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
import build_corpus  # noqa: E402

POLICIES = ("window", "streaming", "h2o", "snapkv")


def prompts(tok, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens, each from consecutive windows of the corpus (no window shared)."""
    _, texts = build_corpus.load()
    out, i = [], 0
    while len(out) < n and i < len(texts):
        ids = []
        while len(ids) < length and i < len(texts):
            ids += tok.encode(texts[i], add_special_tokens=False)
            i += 1
        if len(ids) >= length:
            out.append(ids[:length])
    if len(out) < n:
        raise SystemExit(f"the corpus holds fewer than {n} runs of {length} tokens")
    return out


def run_one(model, tok, backend, ps, a, policy=None, budget=None) -> dict:
    kw = dict(kv_budget_tokens=budget, kv_eviction=policy) if policy else {}
    llm = kvlab.LLM(model=(model, tok), block_size=16, enable_prefix_caching=False, attention_backend=backend,
                    max_num_seqs=len(ps), max_model_len=a.prompt_tokens + a.max_tokens + 1,
                    num_kv_blocks=len(ps) * (-(-(a.prompt_tokens + a.max_tokens) // 16) + 1), **kw)
    params = kvlab.SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)
    rids = [llm.add_request(p, params) for p in ps]
    out = {r: [] for r in rids}
    decode_secs = decode_tokens = peak_blocks = 0
    while llm.has_unfinished_requests():
        all_started = all(out[r] for r in rids)
        t0 = time.perf_counter()
        step = llm.step()
        dt_ = time.perf_counter() - t0
        for o in step:
            out[o.request_id].extend(o.new_token_ids)
        if all_started:
            decode_secs += dt_
            decode_tokens += sum(len(o.new_token_ids) for o in step)
            peak_blocks = max([peak_blocks] + [len(s.block_table) for s in llm.scheduler.running])
    per_block = llm.kv_cache_bytes_allocated / llm.num_kv_blocks
    return {"tokens": [out[r] for r in rids], "decode_tok_s": decode_tokens / decode_secs,
            "peak_blocks": peak_blocks, "mib_per_sequence": peak_blocks * per_block / 2**20}


def agreement(got, ref) -> tuple[float, float]:
    eq = sum(x == y for g, r in zip(got, ref) for x, y in zip(g, r)) / sum(map(len, ref))
    before = []
    for g, r in zip(got, ref):
        diff = [i for i, (x, y) in enumerate(zip(g, r)) if x != y]
        before.append(diff[0] if diff else len(r))
    return eq, statistics.mean(before)


def main(argv=None):
    p = argparse.ArgumentParser(description="KV eviction in the engine: throughput, memory, agreement")
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=1536)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", choices=("fast", "reference"), default="fast")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kv_eviction_engine")
    a = p.parse_args(argv)
    if a.smoke:
        a.budgets, a.sequences, a.prompt_tokens, a.max_tokens, a.rounds = [64], 2, 160, 24, 1
    torch.set_num_threads(a.threads)
    model, tok = kvlab.load_model()
    backend = "torch"
    if a.variant == "fast":
        from kvlab.model.fast import FastLlama
        model, backend = FastLlama.from_llama(model, prepack=True), "cpu"
    ps = prompts(tok, a.sequences, a.prompt_tokens)
    configs = [(None, None)] + [(pol, b) for b in a.budgets for pol in a.policies]
    runs: dict = {c: [] for c in configs}
    start = time.perf_counter()
    run_one(model, tok, backend, ps, a)               # warm-up (first calls, allocator), not counted
    for r in range(a.rounds):
        for c in configs:
            runs[c].append(run_one(model, tok, backend, ps, a, *c))
            print(f"round {r} {c[0] or 'full'} {c[1] or '-'}: {runs[c][-1]['decode_tok_s']:.1f} tok/s", flush=True)
    full = runs[(None, None)]
    ref_tok_s = statistics.median(x["decode_tok_s"] for x in full)
    rows = []
    for c in configs:
        tok_s = statistics.median(x["decode_tok_s"] for x in runs[c])
        eq, before = agreement(runs[c][0]["tokens"], full[0]["tokens"])
        rows.append({"policy": c[0] or "full", "budget": c[1] or "-",
                     "decode_tok_s": round(tok_s, 2), "x_full": round(tok_s / ref_tok_s, 3),
                     "rounds_tok_s": [round(x["decode_tok_s"], 2) for x in runs[c]],
                     "peak_blocks_per_seq": runs[c][0]["peak_blocks"],
                     "mib_per_sequence": round(runs[c][0]["mib_per_sequence"], 3),
                     "greedy_match": round(eq, 4), "tokens_before_diff": round(before, 2)})
    cols = ["policy", "budget", "decode_tok_s", "x_full", "peak_blocks_per_seq", "mib_per_sequence",
            "greedy_match", "tokens_before_diff"]
    table = markdown_table(rows, cols)
    print(table)
    if not a.smoke:
        write(a, argv, time.perf_counter() - start, rows, table)
        plot(rows, a.out.with_suffix(".png"))


def findings(rows) -> str:
    by = {(r["policy"], r["budget"]): r for r in rows}
    budgets = sorted({r["budget"] for r in rows if r["budget"] != "-"})
    pols = [p for p in POLICIES if any(r["policy"] == p for r in rows)]
    full = by[("full", "-")]
    lines = ["## What the run shows (written from the rows above)", ""]
    for b in budgets:
        parts = ", ".join(f"{p} {by[(p, b)]['x_full']:.2f}x" for p in pols)
        lines.append(f"- Budget {b}: decode throughput against the full cache: {parts}; memory per sequence "
                     f"{by[(pols[0], b)]['mib_per_sequence']:.2f} MiB ({pols[0]}) against "
                     f"{full['mib_per_sequence']:.2f} MiB.")
    fastest = max((r for r in rows if r["policy"] != "full"), key=lambda r: r["x_full"])
    slowest = min((r for r in rows if r["policy"] != "full"), key=lambda r: r["x_full"])
    lines.append(f"- Fastest: {fastest['policy']} at {fastest['budget']} ({fastest['x_full']:.2f}x); slowest: "
                 f"{slowest['policy']} at {slowest['budget']} ({slowest['x_full']:.2f}x).")
    best = {b: max(pols, key=lambda p: by[(p, b)]["greedy_match"]) for b in budgets}
    lines.append("- Most greedy tokens equal to the full cache's, per budget: "
                 + ", ".join(f"{b}: {best[b]} ({by[(best[b], b)]['greedy_match']:.0%})" for b in budgets) + ".")
    return "\n".join(lines)


def write(a, argv, secs, rows, table):
    info = run_info("kv_eviction_engine", argv, a, model=f"SmolLM2-135M-Instruct (float32, {a.variant} path)",
                    wall_seconds=round(secs, 1), rows=rows)
    write_results(a.out, info, (
        f"# KV eviction in the engine on SmolLM2-135M: decode throughput, memory, agreement\n\n"
        f"`{info['command']}` on {info['date']} (load average at the end {info['load_average'][0]:.2f}, "
        f"{a.threads} threads, {a.rounds} alternating rounds, median shown)\n\n"
        f"Machine: {json.dumps(info['machine'])}\n\n"
        f"{a.sequences} sequences of {a.prompt_tokens} prompt tokens from the course corpus, {a.max_tokens} greedy "
        f"tokens each, run together; block size 16; {a.variant} path; streaming keeps 4 sinks; h2o's recent "
        "window is half the budget, snapkv's 32 tokens. The engine keeps original positions for every policy "
        "(docs/architecture.md, KV eviction).\n\n"
        f"{table}\n\n{findings(rows)}\n"))


def plot(rows, path: Path):
    import matplotlib.pyplot as plt

    from kvlab.plots import style

    full = next(r for r in rows if r["policy"] == "full")
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for pol in POLICIES:
            rs = [r for r in rows if r["policy"] == pol]
            if rs:
                axes[0].plot([r["budget"] for r in rs], [r["x_full"] for r in rs], marker="o", label=pol)
                axes[1].plot([r["budget"] for r in rs], [r["greedy_match"] for r in rs], marker="o", label=pol)
        axes[0].axhline(1.0, color="grey", lw=1, ls="--", label=f"full cache ({full['decode_tok_s']:.0f} tok/s)")
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("KV budget (tokens per sequence)")
        axes[0].set_ylabel("decode throughput / full cache")
        axes[1].set_ylabel("greedy tokens equal to the full cache's")
        axes[0].legend(fontsize=8)
        fig.suptitle("KV eviction in the engine, SmolLM2-135M on CPU")
        fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)


if __name__ == "__main__":
    main()
