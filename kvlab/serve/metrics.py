"""`/metrics`: Prometheus text from prometheus-client, with vLLM's metric names.

Two sources. The engine's own counts (`LLM.get_metrics()`: cache usage, running and waiting
requests, preemptions, prompt and generation tokens, prefix-cache queries and hits) are read from
the latest snapshot the engine loop took after a step, by a collector, so a scrape never touches
the engine while it runs. Request latencies are observed by the server itself when a request's
tokens reach it: time to first token and end-to-end latency from the moment the HTTP request
arrived (what a client feels, queueing included), the gap between consecutive tokens, and each
finished request's reason (stop, length, abort).

Names as in vLLM (docs.vllm.ai, "Production Metrics"): vllm:num_requests_running,
vllm:num_requests_waiting, vllm:kv_cache_usage_perc, vllm:prefix_cache_queries_total,
vllm:prefix_cache_hits_total, vllm:num_preemptions_total, vllm:prompt_tokens_total,
vllm:generation_tokens_total, vllm:request_success_total{finished_reason},
vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
vllm:request_time_per_output_token_seconds, vllm:e2e_request_latency_seconds,
vllm:request_prompt_tokens, vllm:request_generation_tokens; each labelled with model_name.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvlab.engine.metrics import E2E_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

_GAUGES = {"num_requests_running": "Requests in the running batch.",
           "num_requests_waiting": "Requests queued for admission (engine queue plus those not yet handed to it).",
           "kv_cache_usage_perc": "Fraction of KV-cache blocks in use (1 = full)."}
_COUNTERS = {"num_preemptions": "Preemptions (by recompute).",
             "prompt_tokens": "Prompt tokens received.",
             "generation_tokens": "Tokens generated.",
             "prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
             "prefix_cache_hits": "Prompt tokens found in the prefix cache."}


class _EngineCollector:
    """Yields the engine's gauges and counters from ServerMetrics.snapshot at scrape time."""

    def __init__(self, owner: ServerMetrics):
        self.owner = owner

    def collect(self):
        snap, label = self.owner.snapshot, [self.owner.model_name]
        for name, doc in _GAUGES.items():
            g = GaugeMetricFamily(f"vllm:{name}", doc, labels=["model_name"])
            value = snap.get(name, 0) + (self.owner.pending if name == "num_requests_waiting" else 0)
            g.add_metric(label, float(value))
            yield g
        for name, doc in _COUNTERS.items():
            c = CounterMetricFamily(f"vllm:{name}", doc, labels=["model_name"])
            c.add_metric(label, float(snap.get(name, 0)))
            yield c


class ServerMetrics:
    """Owns the server's Prometheus registry (one per app, so tests can run several)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.snapshot: dict = {}   # the engine's get_metrics(), replaced by the engine loop
        self.pending = 0           # requests accepted by the server, not yet handed to the engine
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(self))
        kw = dict(labelnames=["model_name"], registry=self.registry)
        self.request_success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                                       labelnames=["model_name", "finished_reason"], registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "HTTP arrival to first token.",
                              buckets=TTFT_BUCKETS, **kw).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Gap between consecutive tokens of a request.",
                             buckets=TPOT_BUCKETS, **kw).labels(model_name)
        self.tpot = Histogram("vllm:request_time_per_output_token_seconds",
                              "Per request: (last token - first token) / (tokens - 1).",
                              buckets=TPOT_BUCKETS, **kw).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "HTTP arrival to the request's end.",
                             buckets=E2E_BUCKETS, **kw).labels(model_name)
        self.prompt_len = Histogram("vllm:request_prompt_tokens", "Prompt tokens per finished request.",
                                    buckets=TOKEN_BUCKETS, **kw).labels(model_name)
        self.gen_len = Histogram("vllm:request_generation_tokens", "Generated tokens per finished request.",
                                 buckets=TOKEN_BUCKETS, **kw).labels(model_name)
        for reason in ("stop", "length", "abort"):   # present at 0 from the start
            self.request_success.labels(model_name, reason)

    def observe_token(self, arrival: float, first: float | None, previous: float | None, now: float) -> None:
        """A request's token reached the server at `now` (first: its first token's time, or None)."""
        if first is None:
            self.ttft.observe(now - arrival)
        elif previous is not None:
            self.itl.observe(now - previous)

    def observe_finished(self, reason: str, arrival: float, first: float | None, last: float | None,
                         num_prompt_tokens: int, num_generated: int, now: float) -> None:
        self.request_success.labels(self.model_name, reason).inc()
        if reason == "abort":
            return
        self.e2e.observe(now - arrival)
        self.prompt_len.observe(num_prompt_tokens)
        self.gen_len.observe(num_generated)
        if num_generated > 1 and first is not None and last is not None:
            self.tpot.observe((last - first) / (num_generated - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
