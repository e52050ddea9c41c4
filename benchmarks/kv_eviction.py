"""Dropping KV entries on the real model: perplexity and greedy agreement of each eviction policy.

    python benchmarks/kv_eviction.py            # full run, writes benchmarks/results/kv_eviction.*
    python benchmarks/kv_eviction.py --smoke    # tiny run, prints only

Model: SmolLM2-135M-Instruct (`kvlab.load_model()`), float32, CPU. Corpus: data/pydoc_windows.jsonl;
each sequence joins two consecutive windows (the windows are consecutive slices of one text) and
takes its first `--prompt-tokens + --cont-tokens` tokens.

Protocol, the same for every policy and budget (`kvlab.evict`, the accuracy twin):
1. the prompt (`--prompt-tokens`, longer than every budget) is prefilled once with full attention;
   at the end of each layer's attend the policy cuts the cache to the budget (H2O selects by the
   prompt's accumulated attention, SnapKV by its last queries; `EvictingKVCache.fork` replays that
   cut from one shared prefill, tested equal to running the policy from the start);
2. perplexity: the next `--cont-tokens` tokens are fed one at a time (teacher forcing), the cache
   cut back to the budget after every token; the predicted tokens sit 0..cont-1 tokens past the
   prompt, so every prediction has more context than the budget holds;
3. greedy agreement: from the same prompt, `--greedy-tokens` greedy tokens against the full cache's:
   the fraction of equal positions and the mean number of tokens before the first difference.

Memory per sequence is the entries a layer keeps times the bytes of one token's K and V over all
layers (float32 here; bfloat16 halves it). Engine decode throughput is not measured here: the twin
computes attention explicitly to read its probabilities, so its speed says nothing of the engine's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _results import run_info, write_results
from _table import markdown_table

import kvlab
from kvlab.evict import EvictingKVCache, EvictionConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
import build_corpus  # noqa: E402

POLICIES = ("window", "streaming", "h2o", "snapkv")


def sequences(tok, n: int, length: int) -> tuple[dict, torch.Tensor]:
    header, texts = build_corpus.load()
    out = []
    for i in range(0, len(texts) - 1, 2):
        ids = tok.encode(texts[i] + texts[i + 1], add_special_tokens=False)
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return header, torch.tensor(out)
    raise SystemExit(f"the corpus has fewer than {n} window pairs of {length} tokens")


@torch.no_grad()
def continue_from(model, cache, prompt_logits, cont_ids, greedy_tokens, greedy_cache):
    """(summed NLL of cont_ids, token count, greedy tokens [B, G]) from a prompt's cache."""
    logits, nll = prompt_logits, 0.0
    for t in range(cont_ids.shape[1]):
        target = cont_ids[:, t]
        nll += float(torch.nn.functional.cross_entropy(logits[:, -1], target, reduction="sum"))
        logits = model(cont_ids[:, t:t + 1], cache=cache)
    toks, logits = [], prompt_logits
    for _ in range(greedy_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
        logits = model(nxt, cache=greedy_cache)
    return nll, cont_ids.numel(), torch.cat(toks, 1)


def agreement(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    same = a == ref
    first = [int(row.logical_not().nonzero()[0]) if not row.all() else row.numel() for row in same]
    return float(same.float().mean()), sum(first) / len(first)


def main(argv=None):
    p = argparse.ArgumentParser(description="KV eviction accuracy on the real model")
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=640)
    p.add_argument("--cont-tokens", type=int, default=128)
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--num-sinks", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--streaming-original", action="store_true",
                   help="also run streaming with original positions (the engine's choice), as 'streaming_orig'")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kv_eviction")
    a = p.parse_args(argv)
    if a.smoke:
        a.budgets, a.sequences, a.prompt_tokens, a.cont_tokens, a.greedy_tokens = [16, 32], 2, 48, 8, 4
    if max(a.budgets) >= a.prompt_tokens:
        raise SystemExit(f"--prompt-tokens ({a.prompt_tokens}) must exceed every budget {a.budgets}")
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model, tok = kvlab.load_model()
    cfg = model.config
    header, ids = sequences(tok, a.sequences, a.prompt_tokens + a.cont_tokens)
    prompt, cont = ids[:, :a.prompt_tokens], ids[:, a.prompt_tokens:]
    bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4

    full = EvictingKVCache.for_model(model, a.sequences)
    with torch.no_grad():
        prompt_logits = model(prompt, cache=full, last_only=True)
    print(f"prefill {tuple(prompt.shape)}: {time.perf_counter() - t0:.1f} s", flush=True)

    def run(cfg_, rope_positions=None):
        cache = full.fork(cfg_, rope_positions) if cfg_ else _copy_full(full)
        greedy_cache = full.fork(cfg_, rope_positions) if cfg_ else _copy_full(full)
        return continue_from(model, cache, prompt_logits, cont, a.greedy_tokens, greedy_cache), cache

    (nll_ref, n_ref, greedy_ref), _ = run(None)
    ppl_ref = float(torch.tensor(nll_ref / n_ref).exp())
    rows = [dict(policy="full", budget="-", ppl=ppl_ref, ppl_change_pct=0.0, greedy_match=1.0,
                 tokens_before_diff=float(a.greedy_tokens), entries_per_layer=a.prompt_tokens + a.cont_tokens,
                 mib_per_sequence=(a.prompt_tokens + a.cont_tokens) * bytes_per_token / 2**20)]
    variants = [(p, None) for p in a.policies]
    if a.streaming_original:
        variants.append(("streaming_orig", "original"))
    for budget in a.budgets:
        for policy, rope in variants:
            c = EvictionConfig(policy.removesuffix("_orig"), budget, num_sinks=a.num_sinks)
            ts = time.perf_counter()
            (nll, n, greedy), cache = run(c, rope)
            ppl = float(torch.tensor(nll / n).exp())
            match, before = agreement(greedy, greedy_ref)
            rows.append(dict(policy=policy, budget=budget, ppl=ppl, ppl_change_pct=100 * (ppl / ppl_ref - 1),
                             greedy_match=match, tokens_before_diff=before, entries_per_layer=cache.max_entries,
                             mib_per_sequence=cache.max_entries * bytes_per_token / 2**20))
            print(f"{policy:9s} budget {budget:4d}: ppl {ppl:8.3f} ({rows[-1]['ppl_change_pct']:+.1f} %), "
                  f"greedy {match:.2f}, {time.perf_counter() - ts:.1f} s", flush=True)
    secs = time.perf_counter() - t0
    cols = ["policy", "budget", "ppl", "ppl_change_pct", "greedy_match", "tokens_before_diff",
            "entries_per_layer", "mib_per_sequence"]
    table = markdown_table(rows, cols)
    print(table)
    if a.smoke:
        return rows
    write(a, argv, header, secs, rows, table)
    plot(rows, a.out.with_suffix(".png"))
    return rows


def _copy_full(full: EvictingKVCache) -> EvictingKVCache:
    new = EvictingKVCache(len(full.layers), full.batch, full.num_kv_heads, full.head_dim, None, full.rope_theta)
    new.layers = [s.copy() for s in full.layers]
    new.length, new.num_forwards = full.length, full.num_forwards
    return new


def findings(rows) -> str:
    """What the run says about the published findings, written from the rows."""
    by = {(r["policy"], r["budget"]): r for r in rows}
    budgets = sorted({r["budget"] for r in rows if r["budget"] != "-"})
    lines = ["## What reproduces on a 135M model (written from the rows above)", ""]
    if ("streaming_orig", budgets[0]) in by:
        lines.append("- Positions for streaming, inside the cache (StreamingLLM) / original (the engine's): "
                     "perplexity change " + ", ".join(
                         f"{b}: {by[('streaming', b)]['ppl_change_pct']:+.1f} / "
                         f"{by[('streaming_orig', b)]['ppl_change_pct']:+.1f} %" for b in budgets) + ".")
    if not all((p, b) in by for p in POLICIES for b in budgets):
        return "\n".join(lines)
    rescued = [b for b in budgets if by[("streaming", b)]["ppl"] < by[("window", b)]["ppl"]]
    lines.append(f"- StreamingLLM (sinks rescue a window): streaming beats the plain window at budgets "
                 f"{rescued or 'none'} of {budgets}; window / streaming perplexity change: " + ", ".join(
                     f"{b}: {by[('window', b)]['ppl_change_pct']:+.1f} / "
                     f"{by[('streaming', b)]['ppl_change_pct']:+.1f} %"
                     for b in budgets) + ".")
    best = {b: min(POLICIES, key=lambda pol: by[(pol, b)]["ppl"]) for b in budgets}
    lines.append("- Best policy by perplexity per budget: " + ", ".join(f"{b}: {best[b]}" for b in budgets) + ".")
    small = budgets[0]
    h = by[("h2o", small)]
    lines.append(f"- H2O (a small heavy-hitter budget keeps quality): at the smallest budget ({small} tokens, "
                 f"{small / rows[0]['entries_per_layer']:.0%} of the full context) h2o changes perplexity by "
                 f"{h['ppl_change_pct']:+.1f} % and matches {h['greedy_match']:.0%} of the full cache's greedy tokens; "
                 f"the window alone {by[('window', small)]['ppl_change_pct']:+.1f} %.")
    return "\n".join(lines)


def write(a, argv, header, secs, rows, table):
    info = run_info("kv_eviction", argv, a, model="SmolLM2-135M-Instruct (float32)", corpus=header,
                    wall_seconds=round(secs, 1), rows=rows)
    write_results(a.out, info, (
        f"# KV eviction on SmolLM2-135M: perplexity and greedy agreement\n\n`{info['command']}` on {info['date']} "
        f"(load average at the end {info['load_average'][0]:.1f}; accuracy numbers do not depend on load)\n\n"
        f"Machine: {json.dumps(info['machine'])}\n\nCorpus: {json.dumps(header)}\n\n"
        f"{a.sequences} sequences, prompt {a.prompt_tokens} tokens, perplexity over the next {a.cont_tokens} "
        f"tokens fed one at a time, {a.greedy_tokens} greedy tokens; streaming keeps {a.num_sinks} sinks and counts "
        "positions inside the cache (StreamingLLM); window, h2o and snapkv keep original positions; h2o's recent "
        "window is half the budget, snapkv's observation and decode window 32 tokens, pooling width 7."
        + (" streaming_orig is streaming with original positions (what the engine does).\n\n"
           if a.streaming_original else "\n\n")
        + f"{table}\n\n{findings(rows)}\n"))


def plot(rows, path: Path):
    import matplotlib.pyplot as plt

    from kvlab.plots import style

    with style():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for pol in (*POLICIES, "streaming_orig"):
            rs = [r for r in rows if r["policy"] == pol]
            if not rs:
                continue
            axes[0].plot([r["budget"] for r in rs], [r["ppl_change_pct"] for r in rs], marker="o", label=pol)
            axes[1].plot([r["budget"] for r in rs], [r["greedy_match"] for r in rs], marker="o", label=pol)
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("KV budget (tokens per sequence)")
        axes[0].set_yscale("symlog", linthresh=1)
        axes[0].set_ylabel("perplexity change vs full cache (%)")
        axes[1].set_ylabel("greedy tokens equal to the full cache's")
        axes[1].legend()
        fig.suptitle("Dropping KV entries on SmolLM2-135M")
        fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)


if __name__ == "__main__":
    main()
