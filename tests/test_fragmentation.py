"""The fragmentation replay: every slot accounted for, every request served, the paging bounds hold."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvlab.lab.fragmentation import (
    Contiguous,
    Paged,
    _arena_alloc,
    _arena_free,
    pool_tokens_for,
    replay,
    sessions_per_gpu,
    slots_per_session,
)
from kvlab.lab.traces import SHAREGPT, Request, make_trace

MAX_LEN = 64


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 12))
    reqs = []
    for i in range(n):
        p = draw(st.integers(1, MAX_LEN - 1))
        o = draw(st.integers(1, MAX_LEN - p))
        reqs.append(Request(i, draw(st.floats(0, 2.0)), p, o))
    reqs.sort(key=lambda r: r.arrival_time)
    scheme = draw(st.sampled_from([Contiguous("max"), Contiguous("exact"), Paged(1), Paged(4), Paged(8),
                                   Paged(16), Paged(32), Paged(128)]))
    unit = scheme.block_size if isinstance(scheme, Paged) else 1
    smallest = max(MAX_LEN, -(-MAX_LEN // unit) * unit)
    pool = draw(st.integers(smallest, 4 * smallest))
    seqs = draw(st.sampled_from([None, 1, 3]))
    return reqs, scheme, pool, seqs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_every_slot_is_accounted_for_and_every_request_finishes(w):
    reqs, scheme, pool, seqs = w
    r = replay(reqs, scheme, pool, MAX_LEN, step_seconds=0.1, max_num_seqs=seqs, record_owners=True)
    assert set(r.finish_step) == {q.request_id for q in reqs}
    for q in reqs:  # after its last admission a request runs output_len steps without a pause
        assert r.finish_step[q.request_id] - r.admit_step[q.request_id] + 1 == q.output_len
        assert r.admit_step[q.request_id] >= int(q.arrival_time / 0.1)
    assert np.all(r.used <= r.allocated) and np.all(r.allocated <= pool)
    assert np.array_equal(r.allocated - r.used, r.future + r.never_used)
    assert np.all(r.future >= 0) and np.all(r.never_used >= 0)
    assert np.all(r.external <= pool - r.allocated)
    if seqs is not None:
        assert r.running.max() <= seqs
    # The owner map tells the same story as the counters.
    assert np.array_equal((r.owners >= 0).sum(1) * r.unit, r.allocated)
    assert np.array_equal(r.fill.sum(1), r.used)
    if isinstance(scheme, Paged):
        bs = scheme.block_size
        assert np.all(r.allocated - r.used <= (bs - 1) * r.running)  # only the last block's tail idles
        assert np.all(r.external == 0)                               # any free block fits anyone
    else:
        assert r.preemptions == 0
    if r.preemptions == 0:  # nothing recomputed: the used token-steps are exactly the trace's
        expect = sum(q.prompt_len * q.output_len + q.output_len * (q.output_len + 1) // 2 for q in reqs)
        assert r.used.sum() == expect


def test_paged_block_1_wastes_nothing_and_max_reservation_wastes_what_it_should():
    trace = make_trace(60, SHAREGPT.scaled(0.1), seed=0, max_model_len=256)
    paged = replay(trace, Paged(1), 4096, 256)
    assert paged.summary()["waste_pct"] == 0.0
    cont = replay(trace, Contiguous("max"), 4096, 256)
    # never-used slots of a max reservation: max_model_len - final length, for every step it runs
    expect = sum((256 - q.total_len) * q.output_len for q in trace)
    assert cont.never_used.sum() == expect
    assert cont.running.max() <= 4096 // 256 and cont.external.sum() == 0


def test_without_memory_pressure_every_scheme_runs_the_same_schedule():
    trace = make_trace(30, SHAREGPT.scaled(0.1), rate=20.0, seed=1, max_model_len=256)
    runs = [replay(trace, s, 256 * 40, 256) for s in (Contiguous("max"), Contiguous("exact"), Paged(16))]
    for r in runs[1:]:
        assert np.array_equal(r.used, runs[0].used) and r.preemptions == 0


def test_oracle_reservation_fragments_externally_under_load():
    trace = make_trace(300, SHAREGPT, seed=0, max_model_len=2048)
    r = replay(trace, Contiguous("exact"), 20_000, 2048)
    assert r.external.sum() > 0  # holes too small for the head of the queue, while it waits


def test_preemption_frees_blocks_and_recomputes():
    trace = [Request(i, 0.0, 8, 40) for i in range(4)]  # every request grows to 48 tokens
    r = replay(trace, Paged(8), 96, 64, record_owners=True)  # 12 blocks; 4 x 6 blocks cannot coexist
    assert r.preemptions > 0 and set(r.finish_step) == {0, 1, 2, 3}
    assert r.used.sum() > sum(8 * 40 + 40 * 41 // 2 for _ in trace)  # recomputed work is counted
    for own, fill in zip(r.owners, r.fill):  # each sequence holds exactly the blocks its tokens need
        for rid in np.unique(own[own >= 0]):
            assert (own == rid).sum() == -(-fill[own == rid].sum() // 8)


def test_slots_per_session_closed_form_and_block_rounding():
    trace = make_trace(200, SHAREGPT, seed=0, max_model_len=2048)
    exact = sum(q.prompt_len * q.output_len + q.output_len * (q.output_len + 1) / 2 for q in trace)
    assert slots_per_session(trace, 1) == pytest.approx(exact / sum(q.output_len for q in trace))
    vals = [slots_per_session(trace, b) for b in (1, 8, 16, 32, 128)]
    assert vals == sorted(vals)  # multiples of 2b are multiples of b: rounding only grows
    assert vals[-1] - vals[0] < 128


def test_sessions_per_gpu_matches_a_saturated_replay():
    """Little's law: a full pool holds pool / slots_per_session sessions on average."""
    trace = make_trace(400, SHAREGPT, seed=0, max_model_len=2048)
    pool = 40_000
    s = sessions_per_gpu(pool, trace, 2048, 16)
    assert s["contiguous"] == 19
    r = replay(trace, Paged(16), pool, 2048)
    busy = r.waiting > 0  # steps where the queue is not empty: the pool is the limit
    assert r.running[busy].mean() == pytest.approx(s["paged"], rel=0.15)
    c = replay(trace, Contiguous("max"), pool, 2048)
    assert c.running[c.waiting > 0].mean() == pytest.approx(s["contiguous"], rel=0.01)


def test_arena_first_fit_and_merge():
    holes = [(0, 100)]
    a, b, c = (_arena_alloc(holes, n) for n in (30, 30, 30))
    assert (a, b, c) == (0, 30, 60) and holes == [(90, 10)]
    _arena_free(holes, 0, 30)
    _arena_free(holes, 60, 30)
    assert holes == [(0, 30), (60, 40)] and _arena_alloc(holes, 35) == 60
    _arena_free(holes, 60, 35)
    _arena_free(holes, 30, 30)
    assert holes == [(0, 100)]
    assert _arena_alloc(holes, 101) is None


def test_pool_tokens_for():
    # 80 GB x 0.9 - 26 GB weights = 46 GB; 800 KiB per token -> 56152 tokens
    assert pool_tokens_for(80e9, 26e9, 819_200) == math.floor(46e9 / 819_200)
    with pytest.raises(ValueError, match="no memory left"):
        pool_tokens_for(16e9, 26e9, 819_200)
    with pytest.raises(ValueError, match="utilization"):
        pool_tokens_for(80e9, 0, 1, utilization=1.5)


@pytest.mark.parametrize("call, match", [
    (lambda: replay([Request(0, 0, 60, 10)], Paged(8), 1024, 64), "exceeds max_model_len=64"),
    (lambda: replay([Request(0, 0, 30, 10)], Paged(16), 32, 64), "can never fit"),
    (lambda: replay([Request(0, 0, 3, 3)], Contiguous("max"), 32, 64), "can never fit"),
    (lambda: replay([Request(0, 0, 3, 3)], Paged(8), 0, 64), "pool_tokens"),
    (lambda: replay([Request(0, 0, 3, 3)], Paged(8), 64, 64, step_seconds=0), "step_seconds"),
    (lambda: replay([Request(0, 0, 3, 3)], Paged(8), 64, 64, max_num_seqs=0), "max_num_seqs"),
    (lambda: Paged(0), "block_size"),
    (lambda: Contiguous("pow2"), "reserve"),
    (lambda: slots_per_session([]), "empty"),
])
def test_bad_input_names_the_limit(call, match):
    with pytest.raises(ValueError, match=match):
        call()
