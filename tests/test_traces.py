"""Synthetic traces: seeded, documented shapes, clipped as promised, clear errors."""
import math

import numpy as np
import pytest

from kvlab.lab.traces import (
    ALPACA,
    LMSYS_CHAT,
    SHAREGPT,
    LogNormalLengths,
    TraceShape,
    make_trace,
    poisson_arrivals,
    trace_stats,
)


def test_same_seed_same_trace_other_seed_other_trace():
    a = make_trace(50, SHAREGPT, rate=4.0, seed=3)
    assert a == make_trace(50, SHAREGPT, rate=4.0, seed=3)
    assert a != make_trace(50, SHAREGPT, rate=4.0, seed=4)


def test_rate_does_not_change_lengths():
    a, b = make_trace(40, SHAREGPT, rate=1.0, seed=0), make_trace(40, SHAREGPT, rate=50.0, seed=0)
    assert [(r.prompt_len, r.output_len) for r in a] == [(r.prompt_len, r.output_len) for r in b]
    assert [r.arrival_time for r in a] != [r.arrival_time for r in b]


@pytest.mark.parametrize("shape", [SHAREGPT, ALPACA, LMSYS_CHAT])
def test_lengths_match_the_published_means(shape):
    """With the caps far away, the sample mean is the published mean (the cap at 1024 trims a little)."""
    loose = TraceShape(shape.name, LogNormalLengths(shape.prompt.mean, shape.prompt.sigma, 1, 10**7),
                       LogNormalLengths(shape.output.mean, shape.output.sigma, 1, 10**7))
    s = trace_stats(make_trace(40_000, loose, seed=1))
    assert s["prompt"]["mean"] == pytest.approx(shape.prompt.mean, rel=0.04)
    assert s["output"]["mean"] == pytest.approx(shape.output.mean, rel=0.04)
    # log-normal: median = mean * exp(-sigma^2 / 2)
    assert s["output"]["median"] == pytest.approx(shape.output.mean * math.exp(-shape.output.sigma ** 2 / 2),
                                                  rel=0.05)


def test_lengths_are_clipped_and_integral():
    d = LogNormalLengths(100.0, 2.0, min_len=5, max_len=300)
    x = d.sample(5000, np.random.default_rng(0))
    assert x.dtype == np.int64 and x.min() >= 5 and x.max() <= 300
    assert (x == 5).any() and (x == 300).any()  # sigma 2 reaches both caps


def test_max_model_len_cuts_every_request_to_fit():
    t = make_trace(2000, SHAREGPT, seed=0, max_model_len=256)
    assert all(r.total_len <= 256 and r.prompt_len >= 1 and r.output_len >= 1 for r in t)
    assert max(r.prompt_len for r in t) == 255


def test_poisson_arrivals_are_sorted_with_the_right_rate():
    rng = np.random.default_rng(0)
    t = poisson_arrivals(20_000, 5.0, rng)
    assert np.all(np.diff(t) >= 0) and t[0] > 0
    assert np.diff(t).mean() == pytest.approx(1 / 5.0, rel=0.03)
    assert np.diff(t).std() == pytest.approx(1 / 5.0, rel=0.05)  # exponential gaps: std = mean
    assert np.all(poisson_arrivals(7, math.inf, rng) == 0)


def test_scaled_shape_scales_means_and_caps():
    s = SHAREGPT.scaled(0.125, max_prompt=64, max_output=48)
    assert s.prompt.mean == pytest.approx(161.31 / 8) and s.output.sigma == SHAREGPT.output.sigma
    t = make_trace(500, s, seed=0)
    assert max(r.prompt_len for r in t) <= 64 and max(r.output_len for r in t) <= 48
    assert SHAREGPT.scaled(0.5).prompt.max_len == 512


def test_trace_stats_reports_rate_and_percentiles():
    t = make_trace(3000, ALPACA, rate=10.0, seed=2)
    s = trace_stats(t)
    assert s["num_requests"] == 3000 and s["rate"] == pytest.approx(10.0, rel=0.06)
    assert s["prompt"]["median"] <= s["prompt"]["p90"] <= s["prompt"]["p99"] <= s["prompt"]["max"]
    assert trace_stats(make_trace(5, ALPACA, seed=0))["rate"] == math.inf


@pytest.mark.parametrize("call, match", [
    (lambda: make_trace(0), "num_requests"),
    (lambda: make_trace(5, rate=0.0), "arrival rate"),
    (lambda: make_trace(5, max_model_len=1), "max_model_len"),
    (lambda: LogNormalLengths(0.0, 1.0), "mean"),
    (lambda: LogNormalLengths(10.0, -1.0), "sigma"),
    (lambda: LogNormalLengths(10.0, 1.0, 5, 4), "min_len"),
    (lambda: SHAREGPT.scaled(0), "scale factor"),
    (lambda: trace_stats([]), "empty"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
