"""The one figure style of the course, and `savefig`, which writes `figures/<name>.png`.

Every figure in the notebooks goes through `savefig(fig, "NN_short_name")`, so that `make course`
regenerates the same files under the same names, and a re-run that draws the same thing writes the
same bytes: the PNG carries no timestamp and no software version.

    from kvlab.plots import savefig, style
    with style():
        fig, ax = plt.subplots()
        ...
    savefig(fig, "03_cache_growth")      # -> figures/03_cache_growth.png

`KVLAB_FIGURES_DIR` redirects the folder (the tests point it at a temporary directory, so a test
run never rewrites the committed figures).
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import matplotlib

STYLE = {
    "figure.figsize": (6.4, 4.0),
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.05,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=[
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f"]),
    "legend.frameon": False,
    "image.cmap": "viridis",
    "lines.linewidth": 1.6,
    "svg.hashsalt": "kvlab",  # deterministic ids if a figure is ever saved as SVG
}

_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_PNG_METADATA = {"Software": None}  # Agg writes no time into a PNG; drop the version string too


def apply_style() -> None:
    """Set the course style for the rest of the session (what notebooks call once at the top)."""
    matplotlib.rcParams.update(STYLE)


@contextlib.contextmanager
def style():
    """The course style inside a `with` block only; the previous settings come back after it.

    Only the style comes back, not interactive mode. In a Jupyter kernel the first figure of the
    session resolves the inline backend, which turns interactive mode on so that each figure shows
    under its cell. When that first figure is drawn inside this block, a bare
    `matplotlib.rc_context` (which restores every rcParam but the backend) would switch interactive
    mode off again on the way out, and every later figure of the notebook would be drawn and saved
    but never shown. So interactive mode keeps the value the block ends with.
    """
    interactive = None
    try:
        with matplotlib.rc_context(STYLE):
            try:
                yield
            finally:
                interactive = matplotlib.is_interactive()
    finally:
        if interactive is not None:
            matplotlib.interactive(interactive)


def figures_dir() -> Path:
    """`$KVLAB_FIGURES_DIR` if set, else `figures/` at the repository root (or the working directory
    when kvlab is installed outside a checkout)."""
    env = os.environ.get("KVLAB_FIGURES_DIR")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").exists():
        return root / "figures"
    return Path.cwd() / "figures"


def savefig(fig, name: str) -> Path:
    """Write `fig` to `<figures_dir>/<name>.png` and return the path.

    `name` is a stable identifier such as `"03_cache_growth"`: lowercase letters, digits, `_` and `-`,
    no folder and no extension, so a chapter's figures keep their file names from run to run.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"savefig: name={name!r} must be lowercase letters, digits, '_' or '-' (like "
            f"'03_cache_growth'), without a folder or an extension")
    out = figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    # The save settings are passed explicitly, so a figure saved after its `with style():` block
    # has ended still gets the course's resolution and tight bounding box.
    fig.savefig(path, format="png", metadata=_PNG_METADATA, dpi=STYLE["savefig.dpi"],
                bbox_inches=STYLE["savefig.bbox"], pad_inches=STYLE["savefig.pad_inches"])
    return path
