"""`make course` (kvlab.course.run_course) and the Makefile's guard on `make lab`."""
import os
import subprocess
from pathlib import Path

import nbformat
import pytest

from kvlab.course import run_course
from kvlab.course.paths import ROOT, chapters, is_chapter


def _notebook(path: Path, code: str) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_runs_notebooks_in_order_and_stops_at_the_first_failure(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVLAB_FIGURES_DIR", str(tmp_path / "figs"))
    ok = _notebook(tmp_path / "00_ok.ipynb", "import os\nprint(os.getcwd())")
    bad = _notebook(tmp_path / "01_bad.ipynb", "raise ValueError('broken on purpose')")
    never = _notebook(tmp_path / "02_never.ipynb", "print('not reached')")
    out = tmp_path / "build"
    assert run_course.run([ok, bad, never], out) == 1
    captured = capsys.readouterr()
    assert "[1/3] 00_ok.ipynb ... ok in" in captured.out
    assert "01_bad.ipynb failed in cell" in captured.err and "broken on purpose" in captured.err
    assert (out / "00_ok.ipynb").exists() and (out / "01_bad.ipynb").exists()
    assert not (out / "02_never.ipynb").exists()
    executed = nbformat.read(out / "00_ok.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"].strip() == str(tmp_path)  # runs from its own folder


def test_chapter_names_select_notebooks(tmp_path):
    for name in ["00_tour.ipynb", "_template.ipynb", "scratch.ipynb", "10_triton_kernels.ipynb"]:
        _notebook(tmp_path / name, "")
    assert [p.name for p in chapters(tmp_path)] == ["00_tour.ipynb", "10_triton_kernels.ipynb"]
    assert not is_chapter(Path("notebooks/masters/_template.ipynb"))


@pytest.mark.skipif(os.geteuid() != 0, reason="the guard only matters when running as root")
def test_make_lab_refuses_root_unless_allowed():
    refused = subprocess.run(["make", "-s", "lab-root-check"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "ALLOW_ROOT=1" in refused.stderr
    allowed = subprocess.run(["make", "-s", "lab-root-check", "ALLOW_ROOT=1"], cwd=ROOT,
                             capture_output=True, text=True)
    assert allowed.returncode == 0
    dry = subprocess.run(["make", "-n", "lab", "ALLOW_ROOT=1"], cwd=ROOT, capture_output=True, text=True)
    assert "--allow-root" in dry.stdout


@pytest.mark.slow
def test_nbval_fails_a_notebook_that_saves_a_figure_it_never_shows(tmp_path):
    # kvlab.course.inline_figures (loaded by pyproject's addopts): the same notebook passes when
    # its figure shows under the cell, and fails, naming the figure, when the cell closes it first.
    import sys

    draw = ("import matplotlib.pyplot as plt\nfrom kvlab.plots import savefig, style\n"
            "with style():\n    fig, ax = plt.subplots()\n    ax.plot([0, 1])\n"
            "savefig(fig, '99_demo')\n")
    _notebook(tmp_path / "shown.ipynb", draw)
    _notebook(tmp_path / "hidden.ipynb", draw + "plt.close(fig)\n")
    env = {**os.environ, "MPLBACKEND": "Agg"}     # as `make test` sets it for the pytest process
    runs = {name: subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "kvlab.course.inline_figures",
         "--nbval-lax", "--nbval-current-env", f"{name}.ipynb"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300) for name in ("shown", "hidden")}
    assert runs["shown"].returncode == 0, runs["shown"].stdout[-2000:]
    assert runs["hidden"].returncode != 0
    assert "1 figure file(s) saved (99_demo.png) but only 0 images shown" in runs["hidden"].stdout
