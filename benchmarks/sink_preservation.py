"""Attention-sink preservation: the first tokens of each sequence kept in full precision.

    python benchmarks/sink_preservation.py            # full run, writes benchmarks/results/
    python benchmarks/sink_preservation.py --smoke    # two short windows, prints only

The first token of a sequence collects a large share of attention in every layer (the attention
sink, Xiao et al. 2023, "StreamingLLM"); KVQuant (Hooper et al. 2024) and IntactKV (Liu et al. 2024)
keep such tokens unquantized. With fp8 and smoothed keys the sink's key error grows (its key is
small and far from the mean key that smoothing subtracts; docs/status.md). This measures what
keeping the first `keep_first` positions in full precision buys, for fp8 per KV head with and
without smoothed keys, int4 KIVI G=32 and int2 KIVI G=32, each with keep_first in {0, 1, 4, 32}
(`kvlab.quant.sim.FakeQuantKVCache(keep_first=...)`; for int4/int2 the group holding kept tokens
takes its key scales from its other tokens).

Model, corpus, windows, calibration, chunking and metrics are kv_quant_accuracy.py's, through its
own functions (`--prompts` windows are skipped before the calibration windows, as there, so the
calibration is the same and the keep_first=0 rows repeat its numbers): perplexity change and mean
KL(p_auto || p_format) against the full-precision cache over 32 windows of 256 tokens.

Cost: the kept tokens stay in bfloat16 (the served "auto" format), so each sequence holds
keep_first x (bfloat16 minus the format's `kvlab.quant.bytes_per_token`) more bytes; the
results give that, and the same bytes as tokens of the format.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _table import markdown_table
from kv_quant_accuracy import (
    FP8_CALIBRATION_NOTE,
    ROOT,
    add_data_args,
    load_data,
    perplexity_and_kl,
    ppl_change,
    write_results,
)

from kvlab.quant import bytes_per_token

FORMATS = [("fp8 per-head, smoothed keys", "fp8", {"calibrate": "head smooth"}),
           ("fp8 per-head", "fp8", {"calibrate": "head"}),
           ("int4 KIVI G=32", "int4", {"group_size": 32}),
           ("int2 KIVI G=32", "int2", {"group_size": 32})]


def variants(keeps):
    """(label, kv_cache_dtype, options): the full-precision reference first (KL is against it)."""
    out = [("auto", "auto", {})]
    for lab, fmt, opts in FORMATS:
        out += [(f"{lab}, keep {n}", fmt, {**opts, "keep_first": n}) for n in keeps]
    return out


def by_keep_table(rows, keeps, metric: str) -> str:
    """One row per format, one column per keep_first value, of `metric`."""
    table = []
    for lab, _, _ in FORMATS:
        r = {"format": lab}
        for x in (x for x in rows if x["format"] == lab):
            r[f"keep {x['keep_first']}"] = x[metric]
        table.append(r)
    return markdown_table(table, ["format", *(f"keep {n}" for n in keeps)])


def main(argv=None):
    p = argparse.ArgumentParser(description="Full-precision sink tokens with quantized KV caches")
    add_data_args(p)
    p.add_argument("--keep", type=int, nargs="+", default=[0, 1, 4, 32],
                   help="keep_first values (the first positions kept in full precision)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sink_preservation")
    a = p.parse_args(argv)
    if a.smoke:
        a.ppl_windows, a.ppl_tokens, a.prompts, a.calib_windows, a.keep = 2, 64, 2, 1, [0, 4]
    t0 = time.perf_counter()
    model, header, ppl_ids, _, scales = load_data(a)
    vs = variants(a.keep)
    ppls = ppl_change(perplexity_and_kl(model, ppl_ids, a.chunk, vs, scales, a.batch), vs)
    bf16 = bytes_per_token(model.config, "auto", model_dtype=torch.bfloat16)
    rows = []
    for lab, fmt, o in vs[1:]:
        ppl, change, kl = ppls[lab]
        bpt = bytes_per_token(model.config, fmt, block_size=o.get("group_size"), model_dtype=torch.bfloat16)
        extra = o["keep_first"] * (bf16 - bpt)
        rows.append({"format": lab.rsplit(", keep ", 1)[0], "kv_cache_dtype": fmt,
                     "keep_first": o["keep_first"], "ppl": ppl, "ppl_change_pct": change, "kl_nats": kl,
                     "bytes_per_token": bpt, "extra_bytes_per_seq": extra,
                     "extra_as_tokens": extra / bpt})
    secs = time.perf_counter() - t0
    ref = ppls["auto"][0]
    table = markdown_table(rows, ["format", "keep_first", "ppl", "ppl_change_pct", "kl_nats",
                                  "bytes_per_token", "extra_bytes_per_seq", "extra_as_tokens"])
    body = (f"Full-precision cache (float32): perplexity {ref:.4g}. Changes and KL against it.\n\n{table}\n\n"
            f"## Perplexity change (%) by keep_first\n\n{by_keep_table(rows, a.keep, 'ppl_change_pct')}\n\n"
            f"## KL (nats) by keep_first\n\n{by_keep_table(rows, a.keep, 'kl_nats')}\n\n"
            "extra_bytes_per_seq: keep_first x (bfloat16 minus the format's bytes per token, all layers, "
            f"K and V; bfloat16 = {bf16:.0f} B/token); extra_as_tokens: the same bytes in tokens of the "
            "format. The int4/int2 residual window is not counted (as in kv_quant_accuracy). "
            "Read perplexity differences below about 0.1 % as noise (docs/status.md).")
    print(body)
    print(f"{secs:.0f} s")
    if a.smoke:
        return rows
    write_results(a, argv, "sink_preservation", "Attention-sink preservation (keep_first)", header, secs,
                  rows, body, auto_ppl=ref, fp8_calibration=FP8_CALIBRATION_NOTE)
    return rows


if __name__ == "__main__":
    main()
