"""kvlab.costs.fit: exact on noiseless data, close on noisy data, well conditioned at large n, clear errors."""
import numpy as np
import pytest

from kvlab.costs.fit import fit_quadratic


def test_recovers_exact_coefficients_and_r2_one():
    n = np.arange(1, 50)
    f = fit_quadratic(n, 3.0 + 0.5 * n + 0.01 * n ** 2)
    assert (f.a, f.b, f.c) == pytest.approx((3.0, 0.5, 0.01), rel=1e-9)
    assert f.r2 == pytest.approx(1.0) and f.num_points == 49
    assert f(10) == pytest.approx(3 + 5 + 1)
    assert f.share_quadratic(10) == pytest.approx(1 / 9)


def test_large_n_small_c_is_well_conditioned():
    # seconds per step vs tokens: a 50 ms floor, 4 ms per token, a tiny quadratic term
    n = np.arange(8, 8192, 7, dtype=float)
    y = 0.05 + 4e-3 * n + 3e-7 * n ** 2
    f = fit_quadratic(n, y)
    assert (f.a, f.b, f.c) == pytest.approx((0.05, 4e-3, 3e-7), rel=1e-7)


def test_noisy_data_close_to_truth():
    rng = np.random.default_rng(0)
    n = np.linspace(1, 200, 400)
    y = 1.0 + 0.2 * n + 0.003 * n ** 2
    f = fit_quadratic(n, y + rng.normal(0, 0.5, n.size))
    assert f.c == pytest.approx(0.003, rel=0.05) and f.b == pytest.approx(0.2, rel=0.1)
    assert 0.99 < f.r2 < 1.0
    # the same least-squares answer as numpy's polyfit on the same noisy points
    noisy = y + rng.normal(0, 0.5, n.size)
    g = fit_quadratic(n, noisy)
    assert np.allclose(np.polyfit(n, noisy, 2)[::-1], [g.a, g.b, g.c], rtol=1e-8)


def test_bad_input():
    with pytest.raises(ValueError, match="same length"):
        fit_quadratic([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="3 distinct"):
        fit_quadratic([1, 1, 2, 2], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="finite"):
        fit_quadratic([1, 2, 3], [1, np.nan, 3])
