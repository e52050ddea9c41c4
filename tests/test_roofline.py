"""The roofline helpers: the bound itself, intensity by hand, and that measuring returns sane numbers."""
import pytest

from kvlab.costs.roofline import GPUS, Machine, linear_intensity, measure_bandwidth, measure_peak_flops


def test_attainable_is_the_min_of_the_two_roofs():
    m = Machine("toy", peak_flops=100.0, bandwidth=10.0)
    assert m.ridge == 10.0
    assert m.attainable(2.0) == 20.0 and m.attainable(10.0) == 100.0 and m.attainable(50.0) == 100.0
    with pytest.raises(ValueError, match="intensity"):
        m.attainable(0)


def test_datasheet_ridges():
    assert GPUS["H100 SXM"].ridge == pytest.approx(989e12 / 3.35e12)
    assert GPUS["H200"].bandwidth > GPUS["H100 SXM"].bandwidth
    assert all(g.source for g in GPUS.values())


def test_linear_intensity_by_hand():
    # decode, one token, 4096 x 4096 fp16: 2*4096^2 FLOPs over (4096^2 + 2*4096)*2 bytes ~ 1
    assert linear_intensity(1, 4096, 4096) == pytest.approx(2 * 4096 ** 2 / ((4096 ** 2 + 8192) * 2))
    assert linear_intensity(512, 4096, 4096) > 100 * linear_intensity(1, 4096, 4096)
    with pytest.raises(ValueError):
        linear_intensity(0, 4, 4)


def test_measurements_are_positive_and_finite():
    assert 1e6 < measure_peak_flops(n=64, repeats=2) < 1e15
    assert 1e6 < measure_bandwidth(nbytes=2 ** 20, repeats=2) < 1e13
    with pytest.raises(ValueError, match="repeats"):
        measure_peak_flops(n=8, repeats=0)
