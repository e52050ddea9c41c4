"""kvlab.plots: one style, stable names, deterministic PNG files, the figures folder redirect."""
import hashlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from kvlab import plots  # noqa: E402


def _figure():
    with plots.style():
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2, 3], [0, 1, 4, 9], label="x^2")
        ax.set_title("a figure")
        ax.legend()
    return fig


def test_savefig_writes_a_png_under_the_redirected_dir_and_returns_its_path(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_FIGURES_DIR", str(tmp_path / "figs"))
    fig = _figure()
    path = plots.savefig(fig, "00_example")
    plt.close(fig)
    assert path == tmp_path / "figs" / "00_example.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_figure_gives_the_same_bytes_and_no_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_FIGURES_DIR", str(tmp_path))
    digests = []
    for _ in range(2):
        fig = _figure()
        digests.append(hashlib.sha256(plots.savefig(fig, "same").read_bytes()).hexdigest())
        plt.close(fig)
    assert digests[0] == digests[1]
    data = (tmp_path / "same.png").read_bytes()
    assert b"tIME" not in data and b"Software" not in data and b"matplotlib" not in data.lower()


def test_default_folder_is_figures_at_the_repository_root(monkeypatch):
    monkeypatch.delenv("KVLAB_FIGURES_DIR", raising=False)
    d = plots.figures_dir()
    assert d.name == "figures" and (d.parent / "pyproject.toml").exists()


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "fig.png", "Fig", " x", None])
def test_bad_names_are_refused_with_the_argument_named(bad, tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_FIGURES_DIR", str(tmp_path))
    fig = _figure()
    with pytest.raises(ValueError, match="name="):
        plots.savefig(fig, bad)
    plt.close(fig)
    assert list(tmp_path.iterdir()) == []


def test_style_is_scoped_and_apply_style_is_global():
    before = matplotlib.rcParams["axes.spines.top"]
    with plots.style():
        assert matplotlib.rcParams["axes.spines.top"] is False
    assert matplotlib.rcParams["axes.spines.top"] == before
    with matplotlib.rc_context():
        plots.apply_style()
        assert matplotlib.rcParams["savefig.dpi"] == plots.STYLE["savefig.dpi"]


def test_a_figure_saved_after_its_style_block_keeps_the_course_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_FIGURES_DIR", str(tmp_path))
    with plots.style():
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.set_ylabel("a long label that a default bounding box would cut off")
    inside = plots.savefig(fig, "inside")
    with matplotlib.rc_context({"savefig.dpi": 72, "savefig.bbox": None}):   # outside the block
        outside = plots.savefig(fig, "outside")
    plt.close(fig)
    assert inside.read_bytes() == outside.read_bytes()
    from PIL import Image
    with Image.open(outside) as im:
        assert im.size[1] > 2 * 100   # 150 dpi, tight box: about 2 in tall at 150 px per inch


def test_style_keeps_interactive_mode_switched_on_inside_it():
    # A kernel's inline backend is resolved by the first figure, and turns interactive mode on:
    # when that happens inside style(), the figures drawn after the block must still show.
    was = matplotlib.is_interactive()
    try:
        matplotlib.interactive(False)
        with plots.style():
            matplotlib.interactive(True)        # what the inline backend does on activation
        assert matplotlib.is_interactive()
        assert matplotlib.rcParams["axes.spines.top"] == matplotlib.rcParamsDefault["axes.spines.top"]
        with plots.style():
            pass
        assert matplotlib.is_interactive()      # a block that does not touch it leaves it alone
    finally:
        matplotlib.interactive(was)


@pytest.mark.slow
def test_every_figure_drawn_in_style_blocks_shows_in_a_kernel(tmp_path):
    # The real thing: a Jupyter kernel with its default (inline) backend, three figures drawn in
    # three style() blocks, the first one resolving the backend. Each must come back as an image.
    import os

    import nbformat
    from nbclient import NotebookClient

    cells = ["import matplotlib.pyplot as plt\nfrom kvlab.plots import style"] + [
        f"with style():\n    fig, ax = plt.subplots()\n    ax.plot([0, {i}])" for i in range(3)]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel's own default
    from jupyter_client import KernelManager
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env, cwd=str(tmp_path))
    try:
        NotebookClient(nb, km=km, timeout=120).execute()
    finally:
        km.shutdown_kernel(now=True)
    images = [sum("image/png" in o.get("data", {}) for o in c.outputs) for c in nb.cells[1:]]
    assert images == [1, 1, 1]
