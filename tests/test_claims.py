"""The claims table: every verdict, and the numbers behind it recomputed by hand."""
import math

import pytest

from kvlab.costs.roofline import GPUS
from kvlab.lab import claims
from kvlab.lab.claims import as_rows, check_all, close


@pytest.fixture(scope="module")
def table():
    return {c.number: c for c in check_all()}


def test_nine_claims_with_verdicts_and_reasons(table):
    assert sorted(table) == list(range(1, 10))
    verdicts = {n: c.holds for n, c in table.items()}
    assert verdicts == {1: True, 2: True, 3: True, 4: True, 5: False, 6: False, 7: False, 8: True,
                        9: False}
    for c in table.values():
        assert c.statement and len(c.reason) > 40 and c.assumptions
        assert c.verdict == (c.cases or ("holds" if c.holds else "does not hold"))
        assert c.source.startswith("kvlab issue 3") and len(c.source) > len("kvlab issue 3") + 20
    rows = as_rows()
    assert len(rows) == 9 and rows[4]["verdict"] == "does not hold"


def test_close_is_relative_to_the_computed_number():
    assert close(26, 26.8) and close(90, 100) and not close(89, 100) and not close(2.1, 0.82)


def test_claims_1_to_4_by_hand(table):
    assert 80 * 2 * 64 * 128 * 2 == 2_621_440
    assert table[1].computed == 2_621_440 * 128_000                       # 335.5 GB
    assert table[1].computed / (69.0e9 * 2) > 2
    assert table[2].computed == 8
    assert table[3].computed == 40 * 2 * 40 * 128 * 2 * 4096 * 8 == 26_843_545_600
    assert table[4].computed == 2 ** 31                                    # 2 GiB = 2.15 GB


def test_claim_5_numbers(table):
    per_session = 80 * 2 * 8 * 128 * 2 * 2500
    assert table[5].computed == per_session == 819_200_000
    assert 80 / 2.1 == pytest.approx(38, abs=0.2)                          # how the 38 was reached
    assert "0 sessions" in table[5].reason
    # two 80 GB GPUs at 90 %: 144 - 138 = 6 GB for the cache
    assert f"On two such GPUs {math.floor((144e9 - 138e9) / per_session)} sessions" in table[5].reason
    assert "+63%" in table[5].reason and "-0.5%" in table[5].reason       # 4096/2512, 2500/2512


def test_claim_6_bandwidth_floor(table):
    h100 = GPUS["H100 SXM"]
    weights_read = (69.0e9 - 32000 * 8192) * 2                            # no embedding lookup table
    per_token = weights_read / h100.bandwidth
    assert 0.041 < per_token < 0.0412
    # the KV reads add ~0.5 %: the floor is at least 500 weight reads
    assert 500 * per_token < table[6].computed < 1.01 * 500 * per_token
    assert table[6].computed > 10 * table[6].stated
    h200 = claims.claim_6("H200")
    assert h200.computed == pytest.approx(table[6].computed * 3.35 / 4.8, rel=1e-9)


def test_claim_7_formula_overcounts_gqa(table):
    assert table[7].stated == 80 * 2 * 8192 * 2
    assert table[7].stated / table[7].computed == 8


def test_claim_8_fp8_halves(table):
    assert table[8].computed == pytest.approx(0.5)


def test_claim_9_roofline_ratio(table):
    h100 = GPUS["H100 SXM"]
    # memory-bound at 100 tokens, compute-bound at 4,000: ratio ~ 4000 x bandwidth / peak
    assert table[9].computed == pytest.approx(4000 / h100.ridge, rel=0.03)
    assert not close(40, table[9].computed)
    assert claims.claim_9(first_context=100).computed < claims.claim_9("H200").computed


def test_claims_7_and_9_are_judged_by_case(table):
    assert table[7].cases.startswith("holds for full multi-head attention")
    mha = claims.claim_7().reason
    assert "llama-2-7b 1.00x" in mha and "llama-3.1-70b 8.00x" in mha
    # claim 9: the short step is bandwidth-bound at batch 1 and 2, and reaches the FLOP ratio by batch 4
    assert table[9].cases.startswith("holds from batch 3 on the H100 SXM")
    assert "3: 40.6x" in table[9].reason and "4: 42.9x" in table[9].reason
    assert "not at batch 1 (13.5x)" in table[9].cases


def test_claim_6_on_eight_gpus(table):
    # tensor parallel floors: 8x the bandwidth; fp8 weights halve the weight bytes
    h100x8 = claims.tensor_parallel("H100 SXM", 8)
    assert h100x8.bandwidth == 8 * GPUS["H100 SXM"].bandwidth
    m = claims.MODELS["llama-2-70b"]
    fp16 = claims.decode_floor(m, h100x8)
    assert fp16 == pytest.approx(table[6].computed / 8, rel=1e-9)
    assert round(fp16, 2) == 2.58
    assert round(claims.decode_floor(m, h100x8, weight_dtype_bytes=1), 2) == 1.30
    assert round(claims.decode_floor(m, claims.tensor_parallel("H200", 8), weight_dtype_bytes=1), 2) == 0.90
    assert table[6].cases.endswith("8x H200 with fp8 weights")
