"""kvlab.cluster.sessions and kvlab.cluster.eviction: chat traces and the block-budgeted prefix cache.

Hand-computed LRU, LFU and GDSF victims on tiny trees; hypothesis: the cache never exceeds its
budget, every cached block has its parent cached, child counts stay right, the heap picks the same
victims as the exhaustive scan, hits never exceed what an infinite cache would find.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.cluster.eviction import POLICIES, PrefixCache, block_cost_flops, simulate
from kvlab.cluster.sessions import BlockKeys, ChatWorkload, make_chat_trace, sharing_stats
from kvlab.costs.memory import MODELS

SMALL = ChatWorkload(num_sessions=30, num_system_prompts=3, mean_turns=3.0)


# ---- sessions ---------------------------------------------------------------------------------
def test_trace_is_deterministic_sorted_and_multi_turn():
    a, b = make_chat_trace(SMALL, seed=1), make_chat_trace(SMALL, seed=1)
    assert a == b and a != make_chat_trace(SMALL, seed=2)
    assert [r.arrival_time for r in a] == sorted(r.arrival_time for r in a)
    assert [r.request_id for r in a] == list(range(len(a)))
    by_session = {}
    for r in a:
        by_session.setdefault(r.session_id, []).append(r)
        assert r.prompt_len + r.output_len <= SMALL.max_context
    for turns in by_session.values():
        assert [r.turn for r in turns] == list(range(len(turns)))
        for prev, nxt in zip(turns, turns[1:]):        # the next prompt extends prompt + answer
            assert nxt.prompt[:len(prev.tokens)] == prev.tokens and nxt.prompt_len > len(prev.tokens)
    firsts = [t[0] for t in by_session.values()]
    systems = {}
    for r in firsts:                                   # one system prompt per id, shared
        sys_len = next(len(x.prompt) for x in firsts if x.system_id == r.system_id)
        systems.setdefault(r.system_id, r.prompt[:1])
        assert r.prompt[:1] == systems[r.system_id] and sys_len > 0


def test_workload_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_sessions"):
        ChatWorkload(num_sessions=0)
    with pytest.raises(ValueError, match="mean_turns"):
        ChatWorkload(mean_turns=0.5)
    with pytest.raises(ValueError, match="max_context"):
        ChatWorkload(max_context=100)


def test_block_keys_name_prefixes_exactly():
    k = BlockKeys(2)
    a = k.of((1, 2, 3, 4, 5))
    b = k.of((1, 2, 3, 9))
    c = k.of((7, 7, 3, 4))
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]
    assert c[1] != a[1]                                # same tokens, different parent: different block
    assert k.parent[a[1]] == a[0] and k.parent[a[0]] == -1


def test_sharing_stats_by_hand():
    from kvlab.cluster.sessions import ChatRequest
    r0 = ChatRequest(0, 0, 0, 0.0, 0, (1, 2, 3, 4, 5), (6, 7))
    r1 = ChatRequest(1, 0, 1, 1.0, 0, (1, 2, 3, 4, 5, 6, 7, 8, 9), ())
    s = sharing_stats([r0, r1], block_size=2)
    # r0 finds nothing; r1 looks up blocks of its first 8 tokens: (1,2)(3,4)(5,6)(7,8), finds 3
    assert s["infinite_cache_hit_rate"] == pytest.approx(6 / 14)


# ---- eviction: hand-computed cases --------------------------------------------------------------
def test_lru_evicts_the_oldest_leaf_never_an_inner_block():
    c = PrefixCache(3, "lru")
    assert c.serve([0, 1, 2]) == 0
    assert c.serve([0, 3]) == 1                        # full: leaf 2 goes (1 has a child, 0 pinned)
    assert set(c.entries) == {0, 1, 3}
    assert c.serve([0, 1, 2]) == 2                     # 0, 1 found; 2 evicts leaf 3 (1 is pinned)
    assert set(c.entries) == {0, 1, 2} and c.evictions == 2
    c.check()


def test_lfu_keeps_the_often_used_block():
    c = PrefixCache(2, "lfu")
    for names in ([10], [10], [20]):                   # 10 used twice, 20 once
        c.serve(names)
    c.serve([30])                                      # evicts 20 (fewer uses), LRU would evict 10
    assert set(c.entries) == {10, 30}
    lru = PrefixCache(2, "lru")
    for names in ([10], [10], [20], [30]):
        lru.serve(names)
    assert set(lru.entries) == {20, 30}


def test_gdsf_by_hand_cost_and_inflation():
    c = PrefixCache(2, "gdsf", cost_of=lambda d: 10.0 * (d + 1))
    c.serve([1, 2])                  # prio: 1 -> 10, 2 -> 20 (deeper: costlier)
    c.serve([3])                     # evict leaf 2 (1 is its parent): L = 20; 3 -> 20 + 10 = 30
    assert set(c.entries) == {1, 3} and c.inflation == 20
    c.serve([4])                     # leaves 1 (10) and 3 (30): evict 1, L stays 20; 4 -> 30
    assert set(c.entries) == {3, 4} and c.inflation == 20
    c.serve([5])                     # 3 and 4 tie at 30: the earlier cached (3) goes; L = 30
    assert set(c.entries) == {4, 5} and c.inflation == 30


def test_request_larger_than_budget_keeps_its_prefix():
    c = PrefixCache(3, "lru")
    assert c.serve(list(range(5))) == 0
    assert set(c.entries) == {0, 1, 2}
    assert c.serve(list(range(5)), usable=4) == 3 and c.hit_tokens == 3 and c.queried_tokens == 5 + 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="budget_blocks"):
        PrefixCache(0)
    with pytest.raises(ValueError, match="policy"):
        PrefixCache(4, "fifo")
    with pytest.raises(ValueError, match="usable"):
        PrefixCache(4).serve([1, 2], usable=3)


def test_block_cost_grows_with_depth():
    cost = block_cost_flops(MODELS["llama-3.1-8b"], 16)
    assert cost(0) < cost(1) < cost(100)
    assert cost(1) - cost(0) == pytest.approx(4 * 32 * 128 * 32 * 16 * 16)   # 16 queries x 16 more keys


# ---- eviction: invariants ------------------------------------------------------------------------
paths = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=40)


def _names(keys, path):
    return keys.of(tuple(path))


@settings(max_examples=150, deadline=None)
@given(paths, st.integers(1, 8), st.sampled_from(POLICIES))
def test_budget_tree_and_heap_equals_scan(reqs, budget, policy):
    keys = BlockKeys(1)
    fast = PrefixCache(budget, policy, parent_of=keys.parent, cost_of=lambda d: 1.0 + d)
    slow = PrefixCache(budget, policy, parent_of=keys.parent, cost_of=lambda d: 1.0 + d, exact_scan=True)
    inf = PrefixCache(10**6, policy)
    for p in reqs:
        names = _names(keys, p)
        usable = max(0, len(names) - 1)
        h = fast.serve(names, usable)
        assert h == slow.serve(names, usable)
        assert h <= inf.serve(names, usable) <= usable
        fast.check()
        slow.check()
        assert set(fast.entries) == set(slow.entries)
    assert fast.evictions == slow.evictions and inf.evictions == 0


def test_simulate_on_a_chat_trace():
    trace = make_chat_trace(SMALL, seed=0)
    bound = sharing_stats(trace)["infinite_cache_hit_rate"]
    big = simulate(trace, 10**6, "lru")
    assert big.hit_rate == pytest.approx(bound) and big.evictions == 0
    for policy in POLICIES:
        c = simulate(trace, 64, policy, config=MODELS["llama-3.1-8b"])
        c.check()
        assert 0 < c.hit_rate < bound and c.evictions > 0 and 0 < c.cost_saved <= 1
        assert c.hit_rate == simulate(trace, 64, policy, config=MODELS["llama-3.1-8b"], exact_scan=True).hit_rate
