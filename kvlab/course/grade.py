"""Grade a folder of submitted notebooks locally, without Docker (`make grade SUBMISSIONS=folder`).

Every `*.ipynb` in the folder is graded in its own process, with a timeout, against the autograder
of its chapter (`build/assign/NN_name/autograder.zip`, made by `kvlab.course.assign` when missing).
The chapter is read from the submission's `otter.Notebook("NN_name.ipynb")` line.

- Submissions are never modified: each is copied to a private temporary folder first.
- A notebook that cannot be read, a kernel that dies, a submission that runs past the timeout: the
  row says so in `status`, scores 0, and the next submission is graded.
- Output, in `--out` (default `build/grades/`): `gradebook.csv`, one row per student (the file name
  without `.ipynb`) and one column per question, then `total`, `possible`, `status`; and
  `reports/<student>.txt`, the per-question results with otter's messages.

Grading runs the notebooks with `KVLAB_SMOKE=1` (the sizes the masters are checked with), unless
the environment already sets it.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvlab.course.paths import BUILD, MASTERS

_OTTER_INIT = re.compile(r"""otter\.Notebook\(\s*["']([^"']+\.ipynb)["']""")


@dataclass
class Grade:
    student: str
    chapter: str | None = None
    scores: dict[str, float] = field(default_factory=dict)    # question -> points earned
    possible: dict[str, float] = field(default_factory=dict)  # question -> points possible
    status: str = "ok"
    report: str = ""
    seconds: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.scores.values())


def chapter_of(notebook) -> str | None:
    """The chapter name (`NN_name`) a notebook belongs to, from its otter init cell."""
    for cell in notebook.cells:
        if cell.cell_type == "code":
            m = _OTTER_INIT.search(cell.source)
            if m:
                return Path(m.group(1)).stem
    return None


def autograder_for(chapter: str, assign_dir: Path, masters: Path = MASTERS) -> Path:
    """build/assign/<chapter>/autograder.zip, generated from the master if it is not there yet."""
    zip_path = assign_dir / chapter / "autograder.zip"
    if zip_path.exists():
        return zip_path
    master = masters / f"{chapter}.ipynb"
    if not master.exists():
        raise FileNotFoundError(f"no autograder {zip_path} and no master {master} to build it from")
    from kvlab.course.assign import run_otter_assign

    return run_otter_assign(master, assign_dir / chapter, run_tests=False)


def questions_of(autograder: Path) -> dict[str, float]:
    """{question: points possible} from the test files inside an autograder zip."""
    import zipfile

    out = {}
    with zipfile.ZipFile(autograder) as z:
        for name in sorted(z.namelist()):
            if name.startswith("tests/") and name.endswith(".py"):
                scope: dict = {}
                exec(z.read(name).decode(), scope)  # an otter OK-format file: `test = {...}`
                test = scope["test"]
                points = test.get("points")
                points = 1 if points is None else points
                out[test["name"]] = float(sum(points) if isinstance(points, list) else points)
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and the kernel it started
    except ProcessLookupError:
        pass
    proc.wait()


def grade_one(submission: Path, autograder: Path, chapter: str, timeout: float) -> Grade:
    """Grade one submission in a worker process (`--worker`), in a temporary folder."""
    g = Grade(student=submission.stem, chapter=chapter)
    g.possible = questions_of(autograder)
    g.scores = {q: 0.0 for q in g.possible}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvlab-grade-") as tmp:
        work = Path(tmp) / f"{chapter}.ipynb"  # the name otter.Notebook(...) expects
        shutil.copyfile(submission, work)
        result = Path(tmp) / "result.json"
        env = dict(os.environ)
        env.setdefault("KVLAB_SMOKE", "1")
        env["KVLAB_FIGURES_DIR"] = str(Path(tmp) / "figures")
        env.setdefault("MPLBACKEND", "Agg")
        cmd = [sys.executable, "-m", "kvlab.course.grade", "--worker", str(work), str(autograder),
               str(result)]
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            g.status = f"timeout: still running after {timeout:.0f} s"
            g.report = g.status
            g.seconds = time.perf_counter() - t0
            return g
        g.seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not result.exists():
            last = (out or "").strip().splitlines()[-1:] or ["no output"]
            g.status = f"crashed: grading process exited with {proc.returncode} ({last[0][:200]})"
            g.report = f"{g.status}\n\n{out[-5000:] if out else ''}"
            return g
        data = json.loads(result.read_text())
    g.scores.update({q: r["score"] for q, r in data["questions"].items()})
    g.possible.update({q: r["possible"] for q, r in data["questions"].items()})
    g.report = data["summary"]
    if data.get("error"):
        g.status = f"crashed: {data['error'][:200]}"
    elif data["cells_with_errors"]:
        g.status = f"ok, {data['cells_with_errors']} cell(s) raised an error"
    return g


def worker(submission: str, autograder: str, result: str) -> int:
    """Runs in the child process: otter's local runner, results written as JSON."""
    from otter.run import main as otter_run

    res = otter_run(submission, autograder=autograder, output_dir=None, no_logo=True)
    errors = 0
    if res.notebook is not None:
        errors = sum(1 for c in res.notebook.cells if c.cell_type == "code"
                     and any(o.get("output_type") == "error" for o in c.get("outputs", [])))
    err = res.catastrophic_error
    data = {
        "questions": {n: {"score": tf.score, "possible": tf.possible} for n, tf in res.results.items()},
        "summary": res.summary(),
        "cells_with_errors": errors,
        "error": f"{type(err).__name__}: {err}" if err else None,
    }
    Path(result).write_text(json.dumps(data, indent=1))
    return 0


def grade_folder(folder: Path, out_dir: Path, assign_dir: Path = BUILD / "assign",
                 timeout: float = 600, masters: Path = MASTERS) -> list[Grade]:
    """Grade every `*.ipynb` in `folder`; write the gradebook and the reports; return the grades."""
    import nbformat

    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"SUBMISSIONS={folder}: not a folder of .ipynb files")
    files = sorted(folder.glob("*.ipynb"))
    grades: list[Grade] = []
    for i, sub in enumerate(files, 1):
        print(f"[{i}/{len(files)}] {sub.name} ...", end=" ", flush=True)
        try:
            nb = nbformat.read(sub, as_version=4)
        except Exception as e:
            g = Grade(student=sub.stem, status=f"not a notebook: {type(e).__name__}: {str(e)[:150]}")
        else:
            chapter = chapter_of(nb)
            if chapter is None:
                g = Grade(student=sub.stem, status="not a course notebook: no otter.Notebook(...) cell")
            else:
                try:
                    ag = autograder_for(chapter, assign_dir, masters)
                except Exception as e:
                    g = Grade(student=sub.stem, chapter=chapter, status=f"no autograder: {e}")
                else:
                    g = grade_one(sub, ag, chapter, timeout)
        if not g.report:
            g.report = g.status
        grades.append(g)
        print(f"{g.total:g}/{sum(g.possible.values()):g} {g.status} ({g.seconds:.1f} s)", flush=True)
    write_gradebook(grades, out_dir)
    return grades


def write_gradebook(grades: list[Grade], out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    (out_dir / "reports").mkdir(parents=True, exist_ok=True)
    chapters = sorted({g.chapter for g in grades if g.chapter and g.possible})
    prefix = len(chapters) > 1  # several chapters in one folder: name columns chapter/question

    def col(g: Grade, q: str) -> str:
        return f"{g.chapter}/{q}" if prefix else q

    questions = sorted({col(g, q) for g in grades for q in g.possible})
    path = out_dir / "gradebook.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "chapter", *questions, "total", "possible", "status"])
        for g in grades:
            scores = {col(g, q): s for q, s in g.scores.items()}
            w.writerow([g.student, g.chapter or "", *[f"{scores.get(q, 0):g}" for q in questions],
                        f"{g.total:g}", f"{sum(g.possible.values()):g}", g.status])
    for g in grades:
        lines = [f"student: {g.student}", f"chapter: {g.chapter}", f"status: {g.status}",
                 f"score: {g.total:g} / {sum(g.possible.values()):g}", ""]
        lines += [f"  {q}: {g.scores.get(q, 0):g} / {p:g}" for q, p in sorted(g.possible.items())]
        (out_dir / "reports" / f"{g.student}.txt").write_text("\n".join(lines) + "\n\n" + g.report + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(*argv[1:4])
    ap = argparse.ArgumentParser(description="Grade a folder of submitted notebooks locally.")
    ap.add_argument("submissions", type=Path, help="a folder of .ipynb files")
    ap.add_argument("--out", type=Path, default=BUILD / "grades")
    ap.add_argument("--assign-dir", type=Path, default=BUILD / "assign")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per submission")
    args = ap.parse_args(argv)
    if args.timeout <= 0:
        ap.error(f"--timeout={args.timeout}: must be > 0 seconds")
    try:
        grades = grade_folder(args.submissions, args.out, args.assign_dir, args.timeout)
    except NotADirectoryError as e:
        print(f"make grade: {e}", file=sys.stderr)
        return 2
    print(f"{len(grades)} submissions graded; gradebook: {args.out / 'gradebook.csv'}, "
          f"reports: {args.out / 'reports'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
