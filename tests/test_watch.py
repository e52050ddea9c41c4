"""kvlab.lab.watch: the arithmetic frames equal what a real forward computes, and the pictures get drawn."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kvlab  # noqa: E402
from kvlab.lab import watch  # noqa: E402


def test_naive_relights_everything_cached_one_column():
    L, P, N = 4, 3, 5
    naive = watch.frames("naive", L, P, N, bytes_per_cell=10)
    cached = watch.frames("cached", L, P, N, bytes_per_cell=10)
    assert len(naive) == len(cached) == N
    for t, (fn, fc) in enumerate(zip(naive, cached)):
        n = P + t
        assert fn.computed[:, :n].all() and not fn.computed[:, n:].any() and not fn.stored.any()
        assert fn.cache_bytes == 0
        if t == 0:  # prefill: the whole prompt in one pass
            assert fc.computed[:, :P].all() and not fc.computed[:, P:].any()
        else:       # decode: exactly one new column
            assert fc.computed.sum() == L and fc.computed[:, n - 1].all()
        assert fc.stored[:, :n].all() and not fc.stored[:, n:].any()
        assert fc.cache_bytes == 10 * L * n
    assert naive[-1].computed_total == L * sum(P + t for t in range(N))
    assert cached[-1].computed_total == L * (P + N - 1)
    g = cached[2].grid
    assert g[0, 0] == watch.STORED and g[0, P + 1] == watch.COMPUTED and g[0, -1] == watch.EMPTY


@pytest.mark.parametrize("use_cache", [False, True])
def test_recorded_frames_equal_the_arithmetic_on_a_model(tiny_model, tiny_config, use_cache):
    prompt, N = [5, 17, 42, 8], 6
    rec, tokens = watch.record_frames(tiny_model, prompt, N, use_cache=use_cache)
    bpc = 2 * tiny_config.num_kv_heads * tiny_config.head_dim * 4
    ref = watch.frames("cached" if use_cache else "naive", tiny_config.num_layers, len(prompt), N, bpc)
    for r, f in zip(rec, ref, strict=True):
        assert np.array_equal(r.computed, f.computed) and np.array_equal(r.stored, f.stored)
        assert (r.computed_total, r.cache_bytes) == (f.computed_total, f.cache_bytes)
    assert tokens == kvlab.generate(tiny_model, prompt, N, use_cache=False)


def test_figure_and_gif(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_FIGURES_DIR", str(tmp_path))
    naive = watch.frames("naive", 6, 3, 5, 64)
    cached = watch.frames("cached", 6, 3, 5, 64)
    fig = watch.watch_figure(naive, cached)
    assert len(fig.axes) == 8
    plt.close(fig)
    fig, anim = watch.watch_animation(naive, cached)
    path = watch.save_gif(anim, "99_watch", fps=4, dpi=40)
    plt.close(fig)
    data = path.read_bytes()
    assert path == tmp_path / "99_watch.gif" and data[:6] == b"GIF89a" and len(data) < 1_000_000


def test_bad_input():
    with pytest.raises(ValueError, match="mode"):
        watch.frames("paged", 2, 2, 2)
    with pytest.raises(ValueError, match="new_tokens"):
        watch.frames("naive", 2, 2, 0)
    with pytest.raises(ValueError, match="steps"):
        watch.watch_figure(watch.frames("naive", 2, 2, 2), watch.frames("cached", 2, 2, 2), steps=[5])
    with pytest.raises(ValueError, match="name"):
        watch.save_gif(None, "bad/name")
