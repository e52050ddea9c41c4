"""Synthetic request traces: when requests arrive, how long their prompts are, how much they generate.

A serving experiment needs a workload. Real chat logs are not shipped with kvlab (nothing is downloaded
at test time), so a trace is drawn from documented distributions with a seed:

- **Arrivals** are a Poisson process: the gaps between requests are independent exponential draws with
  mean `1 / rate`. This is how Kwon et al. (2023) generate request arrival times in their evaluation.
  `rate=math.inf` puts every request at t = 0 (an offline batch).
- **Lengths** are log-normal, clipped to `[min_len, max_len]`. A log-normal is right-skewed: most prompts
  and answers are short, a few are very long, which is the shape of the histograms published for chat
  data. The *means* below are published numbers; the spread `sigma` (std of the log-length) is a
  modelling choice of this module, not a fitted value, and is stated next to each preset.

Published means the presets use (tokens):

| preset | prompt mean | output mean | source |
|---|---|---|---|
| `SHAREGPT` | 161.31 | 337.99 | Kwon et al., 2023, Fig. 11 (ShareGPT, OPT tokenizer) |
| `ALPACA` | 19.31 | 58.45 | Kwon et al., 2023, Fig. 11 (Alpaca) |
| `LMSYS_CHAT` | 69.5 | 214.5 | Zheng et al., 2023, Table 1 (LMSYS-Chat-1M, per prompt / per response) |

Clipping moves the mean a little (a long tail cut at `max_len` lowers it); `trace_stats` reports what a
trace actually holds. `TraceShape.scaled(f)` shrinks every length by `f`, to run the same *shape* on a
CPU where 338-token answers for many requests would take too long.

References: W. Kwon et al., 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention" (SOSP). L. Zheng et al., 2023, "LMSYS-Chat-1M: A Large-Scale Real-World LLM Conversation
Dataset" (arXiv:2309.11998).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Request:
    """One request of a trace. Lengths are in tokens; `arrival_time` in seconds from the trace start."""
    request_id: int
    arrival_time: float
    prompt_len: int
    output_len: int

    @property
    def total_len(self) -> int:
        """Tokens the request holds in the KV cache when it finishes: prompt plus every output token."""
        return self.prompt_len + self.output_len


@dataclass(frozen=True)
class LogNormalLengths:
    """Lengths ~ round(LogNormal(mu, sigma)) clipped to [min_len, max_len], with mu set so that the
    unclipped mean is `mean`: for a log-normal, E[x] = exp(mu + sigma^2 / 2), so mu = ln(mean) - sigma^2/2.
    The median is mean * exp(-sigma^2 / 2): sigma = 1 puts it at 61% of the mean."""
    mean: float
    sigma: float
    min_len: int = 1
    max_len: int = 2048

    def __post_init__(self):
        if not self.mean > 0:
            raise ValueError(f"LogNormalLengths.mean must be > 0, got {self.mean}")
        if not self.sigma >= 0:
            raise ValueError(f"LogNormalLengths.sigma must be >= 0, got {self.sigma}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"LogNormalLengths needs 1 <= min_len <= max_len, got min_len={self.min_len}, "
                             f"max_len={self.max_len}")

    @property
    def mu(self) -> float:
        return math.log(self.mean) - self.sigma ** 2 / 2

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        x = rng.lognormal(self.mu, self.sigma, size=n)
        return np.clip(np.rint(x), self.min_len, self.max_len).astype(np.int64)


@dataclass(frozen=True)
class TraceShape:
    """The length distributions of a workload: one for prompts, one for outputs (drawn independently)."""
    name: str
    prompt: LogNormalLengths
    output: LogNormalLengths

    def scaled(self, factor: float, max_prompt: int | None = None,
               max_output: int | None = None) -> TraceShape:
        """The same shape with every mean multiplied by `factor` (sigma unchanged), optionally new caps."""
        if not factor > 0:
            raise ValueError(f"scale factor must be > 0, got {factor}")

        def sc(d: LogNormalLengths, cap: int | None) -> LogNormalLengths:
            hi = cap if cap is not None else max(d.min_len, int(math.ceil(d.max_len * factor)))
            return LogNormalLengths(d.mean * factor, d.sigma, min(d.min_len, hi), hi)

        name = f"{self.name} x{factor:g}"
        return TraceShape(name, sc(self.prompt, max_prompt), sc(self.output, max_output))


# Means from the papers in the module docstring; sigma = 1.0 (prompts) and 0.8 (outputs) are our choice;
# the caps follow the vLLM evaluation, which cut ShareGPT prompts to 1024 tokens and generated at most
# 1024 (Kwon et al., 2023, section 6.2).
SHAREGPT = TraceShape("ShareGPT", LogNormalLengths(161.31, 1.0, 1, 1024),
                      LogNormalLengths(337.99, 0.8, 1, 1024))
ALPACA = TraceShape("Alpaca", LogNormalLengths(19.31, 0.6, 1, 1024), LogNormalLengths(58.45, 0.8, 1, 1024))
LMSYS_CHAT = TraceShape("LMSYS-Chat-1M", LogNormalLengths(69.5, 1.0, 1, 1024),
                        LogNormalLengths(214.5, 0.8, 1, 1024))


def poisson_arrivals(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (seconds) of `n` requests from a Poisson process with `rate` requests per second.
    The first request arrives after one exponential gap, like every other; `rate=inf` gives all zeros."""
    if n < 0:
        raise ValueError(f"number of requests must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"arrival rate must be > 0 requests/s (math.inf = all at once), got {rate}")
    if math.isinf(rate):
        return np.zeros(n)
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


def make_trace(num_requests: int, shape: TraceShape = SHAREGPT, rate: float = math.inf, seed: int = 0,
               max_model_len: int | None = None) -> list[Request]:
    """Draw a trace of `num_requests` requests, sorted by arrival. Same arguments, same trace.

    With `max_model_len`, lengths are cut so every request fits: a prompt to at most `max_model_len - 1`
    tokens (the vLLM evaluation kept the last 1024 tokens of long ShareGPT prompts), then the output to
    what is left, so every request still generates at least one token.
    """
    if num_requests <= 0:
        raise ValueError(f"num_requests must be > 0, got {num_requests}")
    if max_model_len is not None and max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2 (one prompt and one output token), got {max_model_len}")
    rng = np.random.default_rng(seed)
    # Separate streams, so changing the rate does not change the lengths and vice versa.
    r_arr, r_p, r_o = (np.random.default_rng(s) for s in rng.integers(0, 2**63 - 1, size=3))
    arrivals = poisson_arrivals(num_requests, rate, r_arr)
    prompts = shape.prompt.sample(num_requests, r_p)
    outputs = shape.output.sample(num_requests, r_o)
    if max_model_len is not None:
        prompts = np.minimum(prompts, max_model_len - 1)
        outputs = np.minimum(outputs, max_model_len - prompts)
    return [Request(i, float(a), int(p), int(o))
            for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs))]


def trace_stats(trace: list[Request]) -> dict:
    """Mean, median, p90, p99 and max of prompt, output and total lengths; request rate if it has one."""
    if not trace:
        raise ValueError("trace is empty")
    out = {"num_requests": len(trace)}
    for key, vals in (("prompt", [r.prompt_len for r in trace]), ("output", [r.output_len for r in trace]),
                      ("total", [r.total_len for r in trace])):
        v = np.asarray(vals, dtype=np.float64)
        out[key] = {"mean": float(v.mean()), "median": float(np.median(v)),
                    "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)),
                    "max": int(v.max())}
    span = trace[-1].arrival_time - trace[0].arrival_time
    out["rate"] = (len(trace) - 1) / span if span > 0 else math.inf
    return out
