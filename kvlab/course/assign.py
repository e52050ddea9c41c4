"""Masters -> student notebooks and autograders, with otter-grader's `otter assign` (`make students`).

For every `notebooks/masters/NN_name.ipynb`:

1. a copy of the master gets the course's fixed otter settings (`ENFORCED`: an autograder zip, tests
   kept in the notebook, solutions stripped from every cell) and `otter assign` runs on it into
   `build/assign/NN_name/`. With `run_tests` (the default) otter also grades the solved notebook and
   fails unless it scores 100 %.
2. the autograder (public + hidden tests) is kept as `build/assign/NN_name/autograder.zip`; it is
   never committed.
3. the student notebook is normalised (outputs stripped, execution counts cleared, cell ids
   numbered) and, when it has `# NBVAL_CHECK_OUTPUT` cells, executed once with `KVLAB_SMOKE=1`
   so that exactly those cells keep their outputs (marked `keep_output` for nbstripout): they are
   nbval's reference in `make test`. It is written to `notebooks/NN_name.ipynb`.

Masters run with `KVLAB_SMOKE=1` and figures redirected to a temporary folder, so generating the
students never rewrites `figures/`. Files not named `NN_name.ipynb` (the template) are skipped.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import yaml

from kvlab.course.paths import BUILD, MASTERS, NOTEBOOKS, chapters, is_chapter

CHECK_OUTPUT = "# NBVAL_CHECK_OUTPUT"
ENFORCED = {
    "generate": True,                       # otter only runs the tests through an autograder zip
    "strip_solutions_from_all_cells": True,  # a stray `# SOLUTION` line is stripped, not shipped
    "solutions_pdf": False,
    "template_pdf": False,
    "export_cell": False,
    "init_cell": False,                      # the chapter's set-up cell starts the grader (kvlab.course.hosted)
    "tests": {"files": False, "ok_format": True},
}


class AssignError(RuntimeError):
    """otter assign failed on a master, or the generated student notebook does not run."""


@dataclass
class Assigned:
    master: Path
    student: Path          # the written student notebook
    autograder: Path       # build/assign/NN_name/autograder.zip
    seconds: float


def smoke_env(figures_dir: str | None = None) -> dict[str, str]:
    """The environment for every notebook run by the tooling: small sizes, figures kept out of the tree."""
    env = dict(os.environ)
    env.setdefault("KVLAB_SMOKE", "1")
    env["KVLAB_FIGURES_DIR"] = figures_dir or tempfile.mkdtemp(prefix="kvlab-figures-")
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return env


def _config_cell(nb) -> int:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "raw" and cell.source.lstrip().startswith("# ASSIGNMENT CONFIG"):
            return i
    raise AssignError("no raw cell starting with '# ASSIGNMENT CONFIG' (see docs/notebooks.md, Otter format)")


def prepare_master(master: Path, dest_dir: Path) -> Path:
    """Copy `master` into `dest_dir` (same basename) with the ENFORCED otter settings."""
    nb = nbformat.read(master, as_version=4)
    i = _config_cell(nb)
    body = nb.cells[i].source.split("\n", 1)[1] if "\n" in nb.cells[i].source else ""
    config = yaml.safe_load(body) or {}
    config.update(ENFORCED)
    nb.cells[i].source = "# ASSIGNMENT CONFIG\n" + yaml.safe_dump(config, sort_keys=True).strip()
    label_prompts(nb)
    out = dest_dir / master.name
    nbformat.write(nb, out)
    return out


def label_prompts(nb) -> None:
    """Append each question's label (difficulty, study time, points, what is not allowed: from its
    BEGIN QUESTION yaml) to its prompt, the first markdown cell of the question."""
    from kvlab.course.questions import label

    conf = None
    for cell in nb.cells:
        src = cell.source.strip()
        if cell.cell_type == "raw" and src.startswith("# BEGIN QUESTION"):
            conf = yaml.safe_load(src.split("\n", 1)[1]) if "\n" in src else {}
            conf["forbid"] = [str(t) for t in conf.get("forbid") or []]
        elif cell.cell_type == "markdown" and conf is not None:
            if any(conf.get(k) for k in ("difficulty", "minutes", "forbid")):
                cell.source = cell.source.rstrip() + "\n\n" + label(conf)
            conf = None


def write_spec(master: Path, out_dir: Path, autograder: Path | None = None) -> Path:
    """build/assign/NN_name/grading.json (the fresh-interpreter grader's spec), also put in the zip."""
    import json
    import zipfile

    from kvlab.course.questions import chapter_spec

    path = out_dir / "grading.json"
    path.write_text(json.dumps(chapter_spec(master), indent=1))
    if autograder is not None:
        with zipfile.ZipFile(autograder, "a") as z:
            if "grading.json" not in z.namelist():
                z.write(path, "grading.json")
    return path


def run_otter_assign(master: Path, out_dir: Path, run_tests: bool = True, timeout: float = 1800) -> Path:
    """`otter assign` on `master` into `out_dir`; returns out_dir/autograder.zip."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    with tempfile.TemporaryDirectory(prefix="kvlab-assign-") as tmp:
        prepared = prepare_master(master, Path(tmp))
        cmd = [sys.executable, "-m", "otter", "assign", "--no-pdfs", str(prepared), str(out_dir.resolve())]
        if not run_tests:
            cmd.insert(4, "--no-run-tests")
        env = smoke_env(str(Path(tmp) / "figures"))
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AssignError(f"otter assign on {master.name} ran past {timeout:.0f} s") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise AssignError(f"otter assign failed on {master}:\n{tail}")
    zips = sorted((out_dir / "autograder").glob("*-autograder_*.zip"))
    if not zips:
        raise AssignError(f"otter assign wrote no autograder zip for {master.name}")
    stable = out_dir / "autograder.zip"
    shutil.copyfile(zips[-1], stable)
    write_spec(master, out_dir, stable)
    return stable


def normalise(nb) -> None:
    """Strip outputs and counts, number the cell ids; executed NBVAL_CHECK_OUTPUT cells keep both."""
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"c{i:03d}"
        if cell.cell_type != "code":
            continue
        keep = cell.source.lstrip().startswith(CHECK_OUTPUT) and cell.outputs
        if keep:  # nbval compares only cells that were run: they keep their count
            cell.metadata["keep_output"] = True
        else:
            cell.execution_count = None
            cell.metadata.pop("keep_output", None)
            cell.outputs = []
        cell.metadata.pop("execution", None)


def fill_checked_outputs(nb, cwd: Path, timeout: int = 600) -> None:
    """Execute `nb` once (KVLAB_SMOKE=1) so the NBVAL_CHECK_OUTPUT cells hold their reference outputs."""
    if not any(c.cell_type == "code" and c.source.lstrip().startswith(CHECK_OUTPUT) for c in nb.cells):
        return
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    saved = dict(os.environ)
    os.environ.update(smoke_env())
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(cwd)}}).execute()
    except CellExecutionError as e:
        raise AssignError(f"the student notebook does not run end to end:\n{str(e)[-2000:]}") from e
    finally:
        os.environ.clear()
        os.environ.update(saved)


def student_notebook(out_dir: Path, name: str):
    path = out_dir / "student" / name
    if not path.exists():
        raise AssignError(f"otter assign wrote no student notebook {path}")
    return nbformat.read(path, as_version=4)


def assign(master: Path, build_dir: Path = BUILD / "assign", student_dir: Path = NOTEBOOKS,
           run_tests: bool = True, execute: bool = True) -> Assigned:
    """Generate the autograder and the student notebook of one master (see the module docstring)."""
    master = Path(master).resolve()
    if not is_chapter(master):
        raise AssignError(f"master={master.name!r}: expected a name like 03_kv_cache.ipynb")
    t0 = time.perf_counter()
    out_dir = build_dir / master.stem
    autograder = run_otter_assign(master, out_dir, run_tests=run_tests)
    nb = student_notebook(out_dir, master.name)
    normalise(nb)
    student_dir.mkdir(parents=True, exist_ok=True)
    student = student_dir / master.name
    nbformat.write(nb, student)  # otter.Notebook("NN_name.ipynb") reads this file when it runs
    if execute:
        fill_checked_outputs(nb, cwd=student_dir)
        normalise(nb)
        nbformat.write(nb, student)
    return Assigned(master, student, autograder, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate student notebooks and autograders from masters.")
    ap.add_argument("masters", nargs="*", type=Path, help="default: every notebooks/masters/NN_name.ipynb")
    ap.add_argument("--build", type=Path, default=BUILD / "assign")
    ap.add_argument("--students", type=Path, default=NOTEBOOKS)
    ap.add_argument("--no-run-tests", action="store_true", help="do not grade the solved master")
    ap.add_argument("--no-execute", action="store_true", help="do not fill NBVAL_CHECK_OUTPUT outputs")
    args = ap.parse_args(argv)
    masters = [m for m in (args.masters or chapters(MASTERS)) if is_chapter(m)]
    if not masters:
        print("no notebooks/masters/NN_name.ipynb found")
        return 0
    for i, m in enumerate(masters, 1):
        print(f"[{i}/{len(masters)}] {m.name} ...", end=" ", flush=True)
        try:
            r = assign(m, args.build, args.students, run_tests=not args.no_run_tests,
                       execute=not args.no_execute)
        except AssignError as e:
            print("FAILED")
            print(f"\nmake students: {e}", file=sys.stderr)
            return 1
        print(f"ok in {r.seconds:.1f} s -> {r.student}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
