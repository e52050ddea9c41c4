"""kvlab.cluster.disagg: the step-time closed form against forward_cost sums (hypothesis), one
request by hand through each mode, every request finishing with all its tokens, and the effect the
model is for: prefills stall colocated decodes, not disaggregated ones."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.cluster.disagg import MODES, CostModel, simulate
from kvlab.cluster.hardware import LINKS, Link
from kvlab.costs.memory import MODELS, kv_bytes_per_token
from kvlab.costs.roofline import GPUS
from kvlab.lab.traces import LogNormalLengths, Request, TraceShape, make_trace

CM = CostModel(MODELS["llama-3.1-8b"], GPUS["H100 SXM"])
LONG = TraceShape("long prompts", LogNormalLengths(1500, 0.8, 16, 8000), LogNormalLengths(200, 0.8, 1, 1024))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 3000)), max_size=4),
       st.lists(st.integers(0, 8000), max_size=40), st.sampled_from(["llama-3.1-8b", "llama-2-13b", "qwen2.5-7b"]),
       st.floats(0.1, 1.0), st.floats(0.1, 1.0))
def test_step_seconds_equals_forward_cost_sum(chunks, contexts, model, mfu, mbu):
    cm = CostModel(MODELS[model], GPUS["H200"], mfu=mfu, mbu=mbu)
    assert cm.step_seconds(chunks, contexts) == pytest.approx(cm.step_seconds_reference(chunks, contexts), rel=1e-9)


def _decode_chain(p, n_out):
    return [CM.step_seconds([], [p + k]) for k in range(n_out - 1)]


@pytest.mark.parametrize("mode", ["colocated", "chunked"])
def test_one_request_by_hand_colocated(mode):
    r = Request(0, 1.0, 300, 5)
    res = simulate([r], mode, CM, num_gpus=1)
    prefill = CM.step_seconds([(300, 0)])
    assert res.ttft[0] == pytest.approx(prefill)
    assert res.e2e[0] == pytest.approx(prefill + sum(_decode_chain(300, 5)))
    assert res.tpot[0] == pytest.approx(sum(_decode_chain(300, 5)) / 4)


def test_chunked_prompt_spans_steps_by_hand():
    r = Request(0, 0.0, 300, 2)
    res = simulate([r], "chunked", CM, num_gpus=1, max_prefill_tokens=128)
    steps = [CM.step_seconds([(128, 0)]), CM.step_seconds([(128, 128)]), CM.step_seconds([(44, 256)])]
    assert res.ttft[0] == pytest.approx(sum(steps))


def test_one_request_by_hand_disagg():
    link = Link("test", 10e9, latency=1e-3)
    r = Request(0, 0.0, 1000, 3)
    res = simulate([r], "disagg", CM, num_gpus=2, num_prefill=1, link=link)
    prefill = CM.step_seconds([(1000, 0)])
    transfer = 1e-3 + 1000 * kv_bytes_per_token(MODELS["llama-3.1-8b"]) / 10e9
    assert res.ttft[0] == pytest.approx(prefill)
    assert res.e2e[0] == pytest.approx(prefill + transfer + sum(_decode_chain(1000, 3)))
    one = simulate([Request(0, 0.0, 1000, 1)], "disagg", CM, num_gpus=2, link=link)
    assert math.isnan(one.tpot[0]) and one.e2e[0] == pytest.approx(prefill)   # nothing to ship


@pytest.mark.parametrize("mode", MODES)
def test_everyone_finishes(mode):
    trace = make_trace(60, LONG, rate=6.0, seed=1)
    res = simulate(trace, mode, CM, num_gpus=3, num_prefill=1, link=LINKS["InfiniBand NDR (ConnectX-7)"],
                   max_prefill_tokens=1024 if mode == "chunked" else 8192, max_batch=8)
    assert (res.ttft > 0).all() and (res.e2e >= res.ttft).all()
    has_tpot = np.array([r.output_len > 1 for r in trace])
    assert (np.isnan(res.tpot) == ~has_tpot).all() and (res.tpot[has_tpot] > 0).all()
    assert (res.max_gap[has_tpot] >= res.tpot[has_tpot] * (1 - 1e-9)).all()
    assert all(0 <= u <= 1 + 1e-9 for u in res.utilization) and len(res.utilization) == 3


def test_prefills_stall_colocated_decodes_only():
    trace = make_trace(200, LONG, rate=6.0, seed=0)
    link = LINKS["NVLink 4 (H100 SXM)"]
    co = simulate(trace, "colocated", CM, num_gpus=2).summary()
    dis = simulate(trace, "disagg", CM, num_gpus=2, num_prefill=1, link=link).summary()
    ch = simulate(trace, "chunked", CM, num_gpus=2, max_prefill_tokens=512).summary()
    assert co["max_gap_p50"] > 3 * dis["max_gap_p50"] and co["max_gap_p50"] > 2 * ch["max_gap_p50"]


def test_errors():
    with pytest.raises(ValueError, match="mode"):
        simulate([Request(0, 0.0, 10, 2)], "fast", CM)
    with pytest.raises(ValueError, match="link"):
        simulate([Request(0, 0.0, 10, 2)], "disagg", CM)
    with pytest.raises(ValueError, match="num_prefill"):
        simulate([Request(0, 0.0, 10, 2)], "disagg", CM, num_gpus=2, num_prefill=2, link=LINKS["PCIe 5.0 x16"])
    with pytest.raises(ValueError, match="mfu"):
        CostModel(MODELS["llama-3.1-8b"], GPUS["H100 SXM"], mfu=0)
    with pytest.raises(ValueError, match="sliding"):
        CostModel(MODELS["mistral-7b"], GPUS["H100 SXM"])
