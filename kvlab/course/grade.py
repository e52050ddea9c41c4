"""Grade a folder of submitted notebooks locally, without Docker (`make grade SUBMISSIONS=folder`).

Every `*.ipynb` in the folder is graded in its own fresh Python process (`kvlab.course.sandbox`),
with a timeout. The chapter is read from the submission's `otter.Notebook("NN_name.ipynb")` line;
its grading spec (questions, points, forbidden targets, public and hidden tests) comes from the
master, through `build/assign/NN_name/grading.json` or the autograder zip that holds it.

- The notebook itself is never run: from each answer cell (`kvlab.course.questions.solution_cells`)
  only the imports and the function and class definitions are graded, against the master's tests,
  so nothing else in the notebook (a patched `torch.allclose`, an edited test cell, a disabled
  guard) can change a score. A question scores all its points or none (see `sandbox`).
- Submissions are never modified: they are only read.
- A notebook that cannot be read, a grading process that dies or runs past the timeout: the row
  says so in `status`, scores 0, and the next submission is graded.
- Output, in `--out` (default `build/grades/`): `gradebook.csv`, one row per student (the file name
  without `.ipynb`) and one column per question, then `total`, `possible`, `status`; and
  `reports/<student>.txt`, the per-question results with the failing test's message.

Grading runs with `KVLAB_SMOKE=1` unless the environment already sets it.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
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


def spec_for(chapter: str, assign_dir: Path, masters: Path = MASTERS) -> dict:
    """The grading spec of a chapter: build/assign/<chapter>/grading.json, else read from the master."""
    path = Path(assign_dir) / chapter / "grading.json"
    if path.exists():
        return json.loads(path.read_text())
    master = Path(masters) / f"{chapter}.ipynb"
    if not master.exists():
        raise FileNotFoundError(f"no grading spec {path} and no master {master} to read it from")
    from kvlab.course.questions import chapter_spec

    return chapter_spec(master)


def load_spec(source) -> dict:
    """A spec from a dict, a grading.json, a master notebook or an autograder zip holding grading.json."""
    if isinstance(source, dict):
        return source
    source = Path(source)
    if source.suffix == ".zip":
        with zipfile.ZipFile(source) as z:
            return json.loads(z.read("grading.json"))
    if source.suffix == ".ipynb":
        from kvlab.course.questions import chapter_spec

        return chapter_spec(source)
    return json.loads(source.read_text())


def autograder_for(chapter: str, assign_dir: Path, masters: Path = MASTERS) -> dict:
    """Kept for callers of the otter-era API: the chapter's grading spec."""
    return spec_for(chapter, assign_dir, masters)


def questions_of(source) -> dict[str, float]:
    """{question: points possible} of a spec (or anything `load_spec` reads)."""
    return {q["name"]: float(q["points"]) for q in load_spec(source)["questions"]}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything it started
    except ProcessLookupError:
        pass
    proc.wait()


def run_sandbox(spec: dict, variants: list[dict[str, str]], timeout: float,
                test_timeout: float = 120) -> tuple[list[dict] | None, str]:
    """Grade `variants` (each {question: answer source}) in one fresh process.
    Returns (results, "ok") or (None, why not)."""
    with tempfile.TemporaryDirectory(prefix="kvlab-grade-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"spec": spec, "variants": variants, "timeout": test_timeout}))
        env = dict(os.environ)
        env.setdefault("KVLAB_SMOKE", "1")
        env["KVLAB_FIGURES_DIR"] = str(Path(tmp) / "figures")
        env.setdefault("MPLBACKEND", "Agg")
        cmd = [sys.executable, "-m", "kvlab.course.sandbox", str(job), str(result)]
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return None, f"timeout: still running after {timeout:.0f} s"
        if proc.returncode != 0 or not result.exists():
            last = (out or "").strip().splitlines()[-1:] or ["no output"]
            return None, (f"crashed: grading process exited with {proc.returncode} ({last[0][:200]})"
                          f"\n\n{(out or '')[-5000:]}")
        return json.loads(result.read_text()), "ok"


def grade_one(submission: Path, spec, chapter: str, timeout: float) -> Grade:
    """Grade one submission in a fresh process (see the module docstring)."""
    import nbformat

    from kvlab.course.questions import solution_cells

    spec = load_spec(spec)
    g = Grade(student=Path(submission).stem, chapter=chapter)
    g.possible = questions_of(spec)
    g.scores = {q: 0.0 for q in g.possible}
    t0 = time.perf_counter()
    answers = solution_cells(nbformat.read(submission, as_version=4))
    results, status = run_sandbox(spec, [answers], timeout)
    g.seconds = time.perf_counter() - t0
    if results is None:
        g.status = status.split("\n\n")[0]
        g.report = status
        return g
    lines = []
    for q, r in results[0].items():
        g.scores[q] = r["score"]
        lines.append(f"{q}: {r['score']:g} / {r['possible']:g}"
                     + "".join(f"\n    {m}" for m in r["messages"]))
    g.report = "\n".join(lines)
    return g


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
                    spec = spec_for(chapter, assign_dir, masters)
                except Exception as e:
                    g = Grade(student=sub.stem, chapter=chapter, status=f"no grading spec: {e}")
                else:
                    g = grade_one(sub, spec, chapter, timeout)
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


def gradescope(submission_dir: str, results: str, spec: str, timeout: float = 1800) -> int:
    """Gradescope's `run_autograder` entry: grade the one notebook in `submission_dir` against
    `spec` (grading.json) and write Gradescope's results.json (one test per question)."""
    import nbformat

    nbs = sorted(Path(submission_dir).glob("*.ipynb"))
    tests, score = [], 0.0
    spec_d = load_spec(Path(spec))
    possible = questions_of(spec_d)
    if not nbs:
        output = "no .ipynb file in the submission"
        tests = [{"name": q, "score": 0, "max_score": p, "output": output} for q, p in possible.items()]
    else:
        try:
            nbformat.read(nbs[0], as_version=4)
            g = grade_one(nbs[0], spec_d, Path(nbs[0]).stem, timeout)
        except Exception as e:  # noqa: BLE001 - an unreadable notebook scores 0
            g = Grade(student=nbs[0].stem, possible=possible, scores={q: 0.0 for q in possible},
                      status=f"not a notebook: {type(e).__name__}")
        msgs: dict[str, list[str]] = {}
        current = None
        for line in g.report.split("\n"):
            if line and not line.startswith(" ") and ":" in line:
                current = line.split(":")[0]
                msgs[current] = []
            elif line.startswith("    ") and current:
                msgs[current].append(line.strip())
        for q, p in possible.items():
            ok = g.scores.get(q, 0.0) >= p
            why = "\n".join(msgs.get(q, [])) or (g.status if g.status != "ok" else "")
            tests.append({"name": q, "score": g.scores.get(q, 0.0), "max_score": p,
                          "output": "passed" if ok else why[:2000]})
        score = g.total
    Path(results).parent.mkdir(parents=True, exist_ok=True)
    Path(results).write_text(json.dumps({"score": score, "tests": tests}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--gradescope"]:
        return gradescope(*argv[1:4])
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
