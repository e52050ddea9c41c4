"""Every figure a notebook saves must also show in it: a pytest plugin for the nbval runs.

Loaded for every pytest run by `addopts = "-p kvlab.course.inline_figures"` (pyproject.toml), so
`make test` and a notebook run alone under nbval both check it.

nbval runs each notebook in its own kernel, started when the notebook's first cell is set up. Just
before that kernel starts, the hooks give it its own empty figures folder (`KVLAB_FIGURES_DIR`) and
the kernel's own default matplotlib backend (the inline one: `make test` sets `MPLBACKEND=Agg` for
the pytest process, which would make a kernel draw nothing). While the cells run, the image outputs
that come back (`image/png`, `image/gif`, ...) are counted; after the last cell, the notebook fails
unless it showed at least as many images as files it wrote to its figures folder: a figure that is
saved but never shown is what a reader would miss. No notebook runs twice for this.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest


def _notebook(item):
    parent = getattr(item, "parent", None)
    if type(item).__name__ == "IPyNbCell" and type(parent).__name__ == "IPyNbFile":
        return parent
    return None


def _images(outputs) -> int:
    return sum(any(k.startswith("image/") for k in out.get("data", {}))
               for out in outputs or [] if out.get("output_type") in ("display_data", "execute_result"))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    nb = _notebook(item)
    if nb is None or nb.kernel is not None or hasattr(nb, "_kvlab_figures"):
        yield
        return
    nb._kvlab_figures = Path(tempfile.mkdtemp(prefix=f"kvlab-figs-{Path(str(nb.fspath)).stem}-"))
    nb._kvlab_images, nb._kvlab_failed = 0, False
    saved = {k: os.environ.get(k) for k in ("KVLAB_FIGURES_DIR", "MPLBACKEND")}
    os.environ["KVLAB_FIGURES_DIR"] = str(nb._kvlab_figures)
    os.environ.pop("MPLBACKEND", None)
    try:
        yield                                   # the kernel starts here, with this environment
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    nb = _notebook(item)
    if nb is None or not hasattr(nb, "_kvlab_figures"):
        return
    report = outcome.get_result()
    if call.when == "call":
        nb._kvlab_images += _images(getattr(item, "test_outputs", None))
    if report.failed:
        nb._kvlab_failed = True


@pytest.hookimpl(trylast=True)   # after the runner has torn the notebook (and its kernel) down
def pytest_runtest_teardown(item, nextitem):
    nb = _notebook(item)
    if nb is None or not hasattr(nb, "_kvlab_figures") or (nextitem is not None and nextitem.parent is nb):
        return
    folder = nb._kvlab_figures
    written = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    for p in folder.glob("*"):
        p.unlink()
    folder.rmdir() if folder.exists() else None
    if nb._kvlab_failed:
        return                                  # a failing cell has already said what is wrong
    assert nb._kvlab_images >= len(written), (
        f"{Path(str(nb.fspath)).name}: {len(written)} figure file(s) saved ({', '.join(written)}) but only "
        f"{nb._kvlab_images} images shown inline: a figure is saved and never displayed (draw it "
        f"inside `with style():` without closing it, or end the cell with plt.show()/display)")
