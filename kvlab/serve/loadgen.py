"""A load generator for any OpenAI-compatible server: a seeded trace replayed in real time, every
request streamed, and the latencies users feel summarised (benchmarks/serve_load.py, chapter 11).

The trace: Poisson arrivals at `rate` requests per second and log-normal ShareGPT-shaped lengths
from `kvlab.lab.traces` (scaled down for a CPU), with token-id prompts so every server sees exactly
the same tokens; a fraction of the requests starts with one of a few shared system prompts (what
a prefix cache can reuse). Each request asks for exactly its output length (`ignore_eos`).

Per request, from its scheduled arrival: TTFT (first streamed token), ITL (gaps between streamed
chunks), TPOT ((end - first token) / (tokens - 1)), end-to-end latency. Goodput is the rate of
requests that met both latency targets (TTFT and TPOT), over the run's duration, as in
DistServe (Zhong et al., 2024, "DistServe: Disaggregating Prefill and Decoding for
Goodput-optimized Large Language Model Serving").
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import numpy as np

from kvlab.lab.traces import SHAREGPT, TraceShape, make_trace


def cpu_shape(prompt_scale: float = 0.25, output_scale: float = 0.1) -> TraceShape:
    """ShareGPT's length shape with its means scaled (prompts x0.25: mean 40 tokens, at most 256;
    outputs x0.1: mean 34, at most 128): a load a CPU can serve."""
    return TraceShape(f"ShareGPT, prompts x{prompt_scale:g}, outputs x{output_scale:g}",
                      SHAREGPT.scaled(prompt_scale, max_prompt=256).prompt,
                      SHAREGPT.scaled(output_scale, max_output=128).output)


CPU_SHAPE = cpu_shape()


@dataclass(frozen=True)
class Job:
    arrival: float          # seconds after the run starts
    prompt: list[int]       # token ids
    max_tokens: int


def build_trace(num_requests: int, rate: float, seed: int = 0, shape: TraceShape = CPU_SHAPE,
                max_model_len: int = 512, num_system: int = 3, system_len: int = 64, shared: float = 0.5,
                token_range: tuple[int, int] = (1000, 40000)) -> list[Job]:
    """The same arguments give the same jobs (token ids included) for every server."""
    if not 0 <= shared <= 1:
        raise ValueError(f"shared must be a fraction in [0, 1], got {shared}")
    rng = np.random.default_rng(seed + 1)
    lo, hi = token_range
    systems = [rng.integers(lo, hi, system_len).tolist() for _ in range(num_system)]
    reqs = make_trace(num_requests, shape, rate, seed, max_model_len=max_model_len - system_len)
    jobs = []
    for r in reqs:
        prefix = systems[rng.integers(num_system)] if num_system and rng.random() < shared else []
        jobs.append(Job(r.arrival_time, prefix + rng.integers(lo, hi, r.prompt_len).tolist(), r.output_len))
    return jobs


async def _one(client, model: str, job: Job, start: float) -> dict:
    await asyncio.sleep(max(0.0, start + job.arrival - time.perf_counter()))
    t0 = start + job.arrival   # latency counts from the scheduled arrival (a late client is the server's fault)
    body = {"model": model, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    times, tokens, error = [], 0, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if any(c.get("text") for c in chunk.get("choices", [])):
                        times.append(time.perf_counter())
    except Exception as e:   # noqa: BLE001 - a failed request is a result, not a crash of the benchmark
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    ok = error is None and bool(times) and tokens == job.max_tokens
    if error is None and not ok:
        error = f"got {tokens} tokens of {job.max_tokens}"
    return {"ok": ok, "error": error, "tokens": tokens, "prompt_tokens": len(job.prompt),
            "ttft": times[0] - t0 if times else None, "e2e": end - t0,
            "tpot": (end - times[0]) / (tokens - 1) if times and tokens > 1 else None,
            "itl": list(np.diff(times)) if len(times) > 1 else [], "end": end - start}


async def _replay(url: str, model: str, jobs: list[Job], timeout: float) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter() + 0.1
        return await asyncio.gather(*(_one(client, model, j, start) for j in jobs))


def replay(url: str, jobs: list[Job], model: str | None = None, timeout: float = 600) -> list[dict]:
    """Send every job at its arrival time to `url` (http://host:port); one result dict per job."""
    if model is None:
        model = served_model(url)
    return asyncio.run(_replay(url, model, jobs, timeout))


def served_model(url: str) -> str:
    import httpx

    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def _pct(values, qs=(50, 90, 99)) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return {f"p{q}": (float(np.percentile(v, q)) if v.size else None) for q in qs}


def summarize(results: list[dict], jobs: list[Job], ttft_slo: float, tpot_slo: float) -> dict:
    """Throughput, latency percentiles (seconds) and goodput of one replay."""
    ok = [r for r in results if r["ok"]]
    duration = max(r["end"] for r in results) - min(j.arrival for j in jobs)
    good = [r for r in ok if r["ttft"] <= ttft_slo and (r["tpot"] is None or r["tpot"] <= tpot_slo)]
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if r["error"]})[:5],
        "duration_s": duration, "request_throughput": len(ok) / duration,
        "output_token_throughput": sum(r["tokens"] for r in ok) / duration,
        "ttft": _pct(r["ttft"] for r in ok), "tpot": _pct(r["tpot"] for r in ok),
        "itl": _pct(x for r in ok for x in r["itl"]), "e2e": _pct(r["e2e"] for r in ok),
        "goodput": len(good) / duration, "slo_attainment": len(good) / len(results),
    }


def plot(results: dict):
    """Goodput, TTFT p90 and TPOT p90 against the offered rate, one line per server (from the results
    file's "runs")."""
    import matplotlib.pyplot as plt

    from kvlab.plots import style

    with style():
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        servers = sorted({r["server"] for r in results["runs"]}, key=lambda s: (s != "kvlab", s))
        for server in servers:
            runs = sorted((r for r in results["runs"] if r["server"] == server), key=lambda r: r["rate"])
            rates = sorted({r["rate"] for r in runs})

            def mean_at(rate, get, runs=runs):
                vals = [get(r) for r in runs if r["rate"] == rate and get(r) is not None]
                return float(np.mean(vals)) if vals else np.nan

            axes[0].plot(rates, [mean_at(x, lambda r: r["goodput"]) for x in rates], "o-", label=server)
            axes[1].plot(rates, [mean_at(x, lambda r: r["ttft"]["p90"]) for x in rates], "o-", label=server)
            axes[2].plot(rates, [mean_at(x, lambda r: r["tpot"]["p90"]) for x in rates], "o-", label=server)
        slo = results["settings"]
        axes[0].plot(rates, rates, ":", color="grey", label="offered rate")
        axes[1].axhline(slo["ttft_slo"], ls="--", color="grey", label="target")
        axes[2].axhline(slo["tpot_slo"], ls="--", color="grey", label="target")
        for ax, title in zip(axes, ["goodput (requests/s within both targets)", "TTFT p90 (s)", "TPOT p90 (s)"]):
            ax.set_xlabel("offered rate (requests/s)")
            ax.set_title(title)
            ax.legend()
        axes[1].set_yscale("log")
        fig.tight_layout()
    return fig
