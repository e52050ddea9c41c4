"""kvlab.cluster.offload and kvlab.cluster.hardware: reload vs recompute, and the tiered store.

The closed-form break-even equals the brute-force scan (models, links, latencies, MFUs); a toy
model gives a hand-computed break-even; the tiers cascade LRU blocks downwards by hand; hypothesis:
every tier within capacity, each block in one tier, a lower tier never makes a request slower
(HBM behaves the same with or without it), never slower than no cache.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.cluster.hardware import DGX_H100, LINKS, Link
from kvlab.cluster.offload import (
    TieredStore,
    break_even_tokens,
    break_even_tokens_scan,
    recompute_seconds,
    reload_seconds,
    simulate_tiers,
)
from kvlab.cluster.sessions import BlockKeys, ChatWorkload, make_chat_trace
from kvlab.costs.memory import MODELS, KVConfig
from kvlab.costs.roofline import GPUS, Machine

H100 = GPUS["H100 SXM"]
TOY = KVConfig("toy", num_layers=1, num_heads=1, num_kv_heads=1, head_dim=1, hidden_size=1,
               num_params=3.5, max_context=10**6)   # 3 norm weights (h (2 L + 1)), W = 0.5 matmul weights
UNIT = Machine("unit", peak_flops=1.0, bandwidth=1.0)


def test_hardware_numbers_and_sources():
    assert LINKS["PCIe 5.0 x16"].bandwidth == 64e9 and LINKS["HBM3 (H100 SXM)"].bandwidth == H100.bandwidth
    assert all(link.source for link in LINKS.values()) and DGX_H100["source"]
    assert LINKS["PCIe 5.0 x16"].seconds(64e9) == pytest.approx(1.0)
    assert Link("x", 10.0, latency=2.0).seconds(0) == 0 and Link("x", 10.0, latency=2.0).seconds(5) == 2.5
    with pytest.raises(ValueError, match="bandwidth"):
        Link("x", 0.0)
    with pytest.raises(ValueError, match="latency"):
        Link("x", 1.0, latency=-1)


def test_toy_break_even_by_hand():
    # recompute(n) = 2 W n + 2 H D L n (n + 1) = n + 2 n^2 + 2 n; reload(n) = 4 bytes x n / bandwidth
    assert recompute_seconds(TOY, 3, UNIT) == pytest.approx(27.0)
    assert reload_seconds(TOY, 3, Link("half", 0.5)) == pytest.approx(24.0)
    assert break_even_tokens(TOY, Link("one", 1.0), UNIT) == 1          # 4 n <= 2 n^2 + 3 n from n = 1
    assert break_even_tokens(TOY, Link("half", 0.5), UNIT) == 3         # 8 n <= 2 n^2 + 3 n: n >= 2.5
    assert break_even_tokens(TOY, Link("lat", 1.0, latency=100.0), UNIT) == 8   # 2 n^2 - n >= 100: 91 at 7, 120 at 8


@pytest.mark.parametrize("model", ["llama-3.1-8b", "llama-2-13b", "llama-2-7b", "smollm2-135m"])
@pytest.mark.parametrize("mfu", [1.0, 0.4])
def test_closed_form_equals_scan(model, mfu):
    for link in list(LINKS.values()) + [Link("slow", 1e9, 1e-4), Link("lat", 64e9, 2e-3)]:
        n = break_even_tokens(MODELS[model], link, H100, mfu)
        if n < 3000:
            assert n == break_even_tokens_scan(MODELS[model], link, H100, mfu), link.name
        else:   # check the neighbours only: the scan would be slow
            def wins(k, link=link):
                return reload_seconds(MODELS[model], k, link) <= recompute_seconds(MODELS[model], k, H100, mfu)
            assert wins(n) and not wins(n - 1), link.name


def test_ssd_loses_to_recompute_for_short_prefixes_of_an_8b_model():
    ssd = LINKS["NVMe SSD (PCIe 4.0 x4)"]
    n = break_even_tokens(MODELS["llama-3.1-8b"], ssd, H100)
    assert 10_000 < n < 30_000                       # the attention term has to catch up
    assert break_even_tokens(MODELS["llama-3.1-8b"], LINKS["PCIe 5.0 x16"], H100) == 1


def test_errors():
    with pytest.raises(ValueError, match="mfu"):
        break_even_tokens(MODELS["llama-3.1-8b"], LINKS["PCIe 5.0 x16"], H100, mfu=0)
    with pytest.raises(ValueError, match="sliding"):
        recompute_seconds(MODELS["mistral-7b"], 10, H100)
    with pytest.raises(ValueError, match="capacities"):
        TieredStore([], [], MODELS["llama-3.1-8b"], H100)
    with pytest.raises(ValueError, match="link"):
        TieredStore([4, 4], [], MODELS["llama-3.1-8b"], H100)


def test_tiers_cascade_by_hand():
    s = TieredStore([2, 2], [LINKS["PCIe 5.0 x16"]], MODELS["llama-3.1-8b"], H100, block_size=16)
    s.serve([0, 1, 2], usable=2, prompt_len=40)      # stored deepest first: 2, 1, 0 -> 2 pushed down
    assert list(s.tiers[0]) == [1, 0] and list(s.tiers[1]) == [2]
    assert s.found([0, 1, 2, 3]) == [0, 0, 1]
    s.serve([5, 6], usable=1, prompt_len=20)         # HBM [6, 5]; 1, 0 go down, then 2 drops out
    assert list(s.tiers[0]) == [6, 5] and list(s.tiers[1]) == [1, 0] and 2 not in s.where
    k = s.serve([0, 1, 7], usable=2, prompt_len=40)  # both found in DRAM: PCIe reload beats recompute
    assert k == 2 and s.stats.tokens_from == [0, 32]
    s.check()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=8), min_size=1, max_size=30),
       st.integers(1, 5), st.integers(1, 6))
def test_store_invariants(reqs, hbm, dram):
    keys = BlockKeys(1)
    cfg, link = MODELS["llama-3.1-8b"], LINKS["NVMe SSD (PCIe 4.0 x4)"]
    one = TieredStore([hbm], [], cfg, H100, block_size=1)
    two = TieredStore([hbm, dram], [link], cfg, H100, block_size=1)
    for p in reqs:
        names = keys.of(tuple(p))
        before = (one.stats.prefill_seconds, two.stats.prefill_seconds)
        one.serve(names, len(names), len(names) + 1)
        two.serve(names, len(names), len(names) + 1)
        d1, d2 = one.stats.prefill_seconds - before[0], two.stats.prefill_seconds - before[1]
        assert d2 <= d1 * (1 + 1e-12)
        assert list(one.tiers[0]) == list(two.tiers[0])
        one.check()
        two.check()
    assert two.stats.prefill_seconds <= two.stats.no_cache_seconds * (1 + 1e-12)
    assert sum(two.stats.tokens_from) <= two.stats.prompt_tokens


def test_simulate_tiers_on_a_chat_trace():
    trace = make_chat_trace(ChatWorkload(num_sessions=40, num_system_prompts=3, mean_turns=3.0), seed=0)
    cfg, pcie = MODELS["llama-3.1-8b"], LINKS["PCIe 5.0 x16"]
    hbm = simulate_tiers(trace, [60], [], cfg, H100)
    both = simulate_tiers(trace, [60, 400], [pcie], cfg, H100)
    assert both.stats.tokens_from[0] == hbm.stats.tokens_from[0] and both.stats.tokens_from[1] > 0
    assert both.stats.prefill_seconds < hbm.stats.prefill_seconds < hbm.stats.no_cache_seconds
