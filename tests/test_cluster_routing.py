"""kvlab.cluster.routing: router choices by hand; hypothesis: every request is routed exactly once,
the prefix-aware choice respects the load bound and holds the longest prefix among the eligible,
waits and TTFTs are consistent, one replica makes every policy the same."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.cluster.routing import ROUTERS, choose_replica, decode_seconds_per_token, route_trace
from kvlab.cluster.sessions import ChatWorkload, make_chat_trace
from kvlab.costs.memory import MODELS
from kvlab.costs.roofline import GPUS
from kvlab.lab.traces import LogNormalLengths

H100, CFG = GPUS["H100 SXM"], MODELS["llama-3.1-8b"]
TRACE = make_chat_trace(ChatWorkload(num_sessions=60, session_rate=20.0, think_time=2.0, mean_turns=3.0,
                                     num_system_prompts=4), seed=3)


def test_choices_by_hand():
    m, b = [0, 5, 3, 5], [0.0, 2.0, 0.0, 0.1]
    assert [choose_replica("round_robin", i, m, b, 7, 1.0) for i in range(5)] == [0, 1, 2, 3, 0]
    assert choose_replica("least_loaded", 0, m, b, 7, 1.0) == 0
    assert choose_replica("least_loaded", 1, m, b, 7, 1.0) == 2       # tie 0 / 2: rotate from index 1
    # mean with the new work: (2.1 + 1.0) / 4 = 0.775; bound 1.25 -> 0.969: replica 1 (2.0) not eligible
    assert choose_replica("prefix_aware", 0, m, b, 7, 1.0) == 3       # longest match among 0, 2, 3
    # bound 3 -> 2.325: all eligible; 1 and 3 tie on 5 blocks, 3 is less loaded
    assert choose_replica("prefix_aware", 0, m, b, 7, 1.0, load_bound=3.0) == 3
    assert choose_replica("prefix_aware", 0, [0, 6, 3, 5], b, 7, 1.0, load_bound=3.0) == 1
    assert choose_replica("prefix_aware", 0, [0] * 4, b, 7, 1.0) == 0   # no match anywhere: least loaded
    assert choose_replica("prefix_hash", 0, m, b, 7, 1.0) == choose_replica("prefix_hash", 9, m, [9.0] * 4, 7, 0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="policy"):
        choose_replica("random", 0, [0], [0.0], 1, 0.0)
    with pytest.raises(ValueError, match="load_bound"):
        choose_replica("prefix_aware", 0, [0], [0.0], 1, 0.0, load_bound=0.5)
    with pytest.raises(ValueError, match="num_replicas"):
        route_trace(TRACE, 0, "round_robin", CFG, H100)
    with pytest.raises(ValueError, match="batch"):
        decode_seconds_per_token(CFG, H100, 0, 10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=8), st.data())
def test_prefix_aware_respects_the_bound(matches, data):
    n = len(matches)
    backlogs = data.draw(st.lists(st.floats(0, 10), min_size=n, max_size=n))
    new, bound = data.draw(st.floats(0, 5)), data.draw(st.floats(1, 3))
    k = choose_replica("prefix_aware", data.draw(st.integers(0, 100)), matches, backlogs, 0, new, bound)
    cap = bound * (sum(backlogs) + new) / n
    assert backlogs[k] <= cap
    assert matches[k] == max(m for m, b in zip(matches, backlogs) if b <= cap)


@pytest.mark.parametrize("policy", ROUTERS)
@pytest.mark.parametrize("replicas", [1, 3])
def test_every_request_routed_exactly_once(policy, replicas):
    d = decode_seconds_per_token(CFG, H100, 32, 1000)
    r = route_trace(TRACE, replicas, policy, CFG, H100, budget_blocks=200, decode_seconds_per_token=d)
    assert len(r.replica) == len(TRACE) and all(0 <= k < replicas for k in r.replica)
    assert sum(r.requests_per_replica()) == len(TRACE)
    assert all(0 <= w <= t for w, t in zip(r.wait, r.ttft))
    assert all(0 <= h < p for h, p in zip(r.hit_tokens, r.prompt_tokens))
    assert r.imbalance >= 1.0 and 0 <= r.hit_rate < 1
    if policy == "round_robin":
        assert r.requests_per_replica() == [len(TRACE) // replicas + (i < len(TRACE) % replicas)
                                            for i in range(replicas)]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.floats(0.5, 50.0), st.integers(1, 5), st.sampled_from(ROUTERS), st.integers(0, 10**6),
       st.integers(4, 400))
def test_random_traces_route_every_request_once(sessions, rate, replicas, policy, seed, budget):
    w = ChatWorkload(num_sessions=sessions, session_rate=rate, think_time=1.0, mean_turns=2.0, num_system_prompts=2,
                     system_len=LogNormalLengths(40.0, 0.5, 16, 128), max_context=1024)
    trace = make_chat_trace(w, seed=seed)
    r = route_trace(trace, replicas, policy, CFG, H100, budget_blocks=budget, decode_seconds_per_token=1e-4)
    assert len(r.replica) == len(trace) == sum(r.requests_per_replica())
    assert all(0 <= k < replicas for k in r.replica)
    assert sum(r.prompt_tokens) == sum(q.prompt_len for q in trace)
    assert all(0 <= w <= t for w, t in zip(r.wait, r.ttft))


def test_one_replica_every_policy_is_the_same():
    runs = [route_trace(TRACE, 1, p, CFG, H100, budget_blocks=100) for p in ROUTERS]
    assert all(r.hit_tokens == runs[0].hit_tokens and r.ttft == runs[0].ttft for r in runs)


def test_prefix_aware_finds_more_than_round_robin():
    rr = route_trace(TRACE, 4, "round_robin", CFG, H100, budget_blocks=300)
    pa = route_trace(TRACE, 4, "prefix_aware", CFG, H100, budget_blocks=300)
    assert pa.hit_rate > rr.hit_rate + 0.1
    assert sum(pa.work) < sum(rr.work)                # hits are prefill not done


def test_decode_share_is_the_roofline_step_over_batch():
    one = decode_seconds_per_token(CFG, H100, 1, 0)
    weights = 8.03e9 - 128256 * 4096                 # all but the input embedding table, read once in bf16
    assert one == pytest.approx(2 * weights / H100.bandwidth, rel=1e-3)
    assert decode_seconds_per_token(CFG, H100, 64, 0) < one / 30
