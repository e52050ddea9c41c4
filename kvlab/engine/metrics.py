"""Engine metrics, named like vLLM's, and their Prometheus text rendering.

Gauges: kv_cache_usage_perc (fraction of KV blocks in use, 0..1 as in vLLM),
num_requests_running, num_requests_waiting. Counters: num_preemptions, prompt_tokens,
generation_tokens, num_requests_finished (aborts included), num_requests_aborted,
prefix_cache_queries and prefix_cache_hits (prompt tokens looked up in the prefix cache at
admission, and how many were found). Histograms: time_to_first_token_seconds (arrival -> first
token), time_per_output_token_seconds (mean gap between later tokens of one request),
e2e_request_latency_seconds; an aborted request is not observed in them.

Each counter has one owner: `EngineMetrics` holds what the engine core writes (tokens, finished
requests, latencies); the scheduler counts preemptions and the prefix cache (block manager or
radix cache) its queries and hits. `LLM.get_metrics()` gathers them.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0)


@dataclass
class Histogram:
    """Cumulative-bucket histogram as Prometheus defines it (le = "less than or equal")."""
    buckets: tuple[float, ...]
    counts: list[int] = field(default=None)   # per bucket, not cumulative; last = +Inf
    sum: float = 0.0
    count: int = 0
    values: list[float] = field(default_factory=list)   # kept for percentiles in notebooks

    def __post_init__(self):
        if self.counts is None:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1
        self.values.append(value)

    def mean(self) -> float:
        return self.sum / self.count if self.count else float("nan")


@dataclass
class EngineMetrics:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_requests_finished: int = 0
    num_requests_aborted: int = 0
    time_to_first_token_seconds: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    time_per_output_token_seconds: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    e2e_request_latency_seconds: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))

    def observe_finished(self, seq) -> None:
        """Record one finished request's latencies (an aborted one is counted, not timed)."""
        self.num_requests_finished += 1
        if seq.finish_reason == "abort":
            self.num_requests_aborted += 1
            return
        if seq.first_token_time is None:
            return
        self.time_to_first_token_seconds.observe(seq.first_token_time - seq.arrival_time)
        n = seq.num_completion_tokens
        if n > 1 and seq.finish_time is not None:
            self.time_per_output_token_seconds.observe((seq.finish_time - seq.first_token_time) / (n - 1))
        if seq.finish_time is not None:
            self.e2e_request_latency_seconds.observe(seq.finish_time - seq.arrival_time)


COUNTERS = ("num_preemptions", "prompt_tokens", "generation_tokens", "num_requests_finished",
            "num_requests_aborted", "prefix_cache_queries", "prefix_cache_hits")
GAUGES = ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting")


def render_prometheus(metrics: dict, prefix: str = "kvlab:") -> str:
    """The dict of LLM.get_metrics() in Prometheus text exposition format."""
    lines = []
    for name in GAUGES:
        lines += [f"# TYPE {prefix}{name} gauge", f"{prefix}{name} {metrics[name]}"]
    for name in COUNTERS:
        lines += [f"# TYPE {prefix}{name}_total counter", f"{prefix}{name}_total {metrics[name]}"]
    for name, value in metrics.items():
        if not isinstance(value, Histogram):
            continue
        lines.append(f"# TYPE {prefix}{name} histogram")
        running = 0
        for le, c in zip((*value.buckets, "+Inf"), value.counts):
            running += c
            lines.append(f'{prefix}{name}_bucket{{le="{le}"}} {running}')
        lines += [f"{prefix}{name}_sum {value.sum}", f"{prefix}{name}_count {value.count}"]
    return "\n".join(lines) + "\n"
