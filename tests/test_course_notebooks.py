"""Every chapter's master and student notebook, generically over notebooks/masters/NN_name.ipynb.

Per chapter, the master is assigned again into a temporary folder (otter assign grades the solved
master there and fails unless it scores 100 %), then:
- the committed student notebook equals the regenerated one (cell types, sources, public tests);
- no solution line and no hidden test appears in the student notebook;
- the untouched student notebook, graded with the hidden tests, runs without a cell raising and
  scores 0 on every question.
That the student notebooks run end to end and match their `# NBVAL_CHECK_OUTPUT` outputs is nbval's
job: `make test` passes every notebooks/NN_name.ipynb to pytest with `--nbval-lax`.
Each master runs once and each student notebook once here (plus once under nbval).
"""
import functools
import json
import re
from pathlib import Path

import nbformat
import pytest

from kvlab.course.assign import assign
from kvlab.course.grade import grade_one
from kvlab.course.paths import MASTERS, NOTEBOOKS, chapters
from kvlab.course.questions import cell_test_lines, is_hidden_test

MASTER_FILES = chapters(MASTERS)
pytestmark = pytest.mark.slow


@functools.cache
def assigned(chapter: str, tmp: str):
    return assign(MASTERS / f"{chapter}.ipynb", build_dir=Path(tmp) / "build",
                  student_dir=Path(tmp) / "students", run_tests=True, execute=False)


@pytest.fixture(scope="session")
def course_tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("course"))


def _cells(nb):
    return [(c.cell_type, c.source) for c in nb.cells]


def _read(path):
    return nbformat.read(path, as_version=4)


def solution_lines(master) -> set[str]:
    """Lines of solution code in a master: inside BEGIN/END SOLUTION (raw cells or comments), or
    ending in `# SOLUTION`; lines that also appear outside solutions (narrative code) are left out."""
    inside_cells, sol, other = False, set(), set()
    for cell in master.cells:
        src = cell.source.strip()
        if cell.cell_type == "raw":
            if src.startswith("# BEGIN SOLUTION"):
                inside_cells = True
            elif src.startswith("# END SOLUTION"):
                inside_cells = False
            continue
        if cell.cell_type != "code":
            continue
        inside = False
        for line in cell.source.splitlines():
            s = line.strip()
            if s.startswith("# BEGIN SOLUTION"):
                inside = True
                continue
            if s.startswith("# END SOLUTION"):
                inside = False
                continue
            if inside or s.endswith("# SOLUTION"):
                sol.add(re.sub(r"\s*# SOLUTION$", "", s))
            elif not inside_cells:
                other.add(s)
    return {s for s in sol - other if len(s) > 3 and s not in {"pass", "...", "return"}}


def hidden_test_lines(master) -> set[str]:
    """Lines of the master's hidden tests (`# HIDDEN` or otter's `hidden: true` test config) that
    appear nowhere else in the master: a line the narrative, a public test or a stub also holds is
    shipped to students legitimately, so finding it in their notebook reveals nothing."""
    hidden, other = set(), set()
    in_tests = False
    for cell in master.cells:
        src = cell.source.strip()
        if cell.cell_type == "raw":
            in_tests = src.startswith("# BEGIN TESTS") or (in_tests and not src.startswith("# END TESTS"))
            continue
        if cell.cell_type != "code":
            continue
        if in_tests and is_hidden_test(src):
            hidden |= set(cell_test_lines(src))
        else:
            other |= {ln.strip() for ln in cell.source.splitlines() if ln.strip()}
    return {s for s in hidden - other if not s.startswith("#") and len(s) > 3}


def test_there_are_masters_and_each_has_a_committed_student_notebook():
    if not MASTER_FILES:
        pytest.skip("no notebooks/masters/NN_name.ipynb yet")
    missing = [m.name for m in MASTER_FILES if not (NOTEBOOKS / m.name).exists()]
    assert not missing, f"run `make students` and commit notebooks/{missing}"


class ChapterTests:
    """The checks of one chapter. One subclass per master (below), so that `--dist loadscope`
    spreads the chapters over the xdist workers while each chapter's tests share one worker (and
    its one `otter assign` run)."""
    chapter: str

    def test_master_scores_full_marks(self, course_tmp):
        chapter = self.chapter
        result = assigned(chapter, course_tmp)  # AssignError unless the master scores 100 %
        assert result.autograder.exists()

    def test_student_notebook_is_in_sync_with_its_master(self, course_tmp):
        chapter = self.chapter
        committed = NOTEBOOKS / f"{chapter}.ipynb"
        fresh = _read(assigned(chapter, course_tmp).student)
        ours = _read(committed)
        assert _cells(ours) == _cells(fresh), f"{committed} is stale: run `make students` and commit it"
        assert ours.metadata.get("otter") == fresh.metadata.get("otter")

    def test_no_solution_and_no_hidden_test_in_the_student_notebook(self):
        chapter = self.chapter
        master = _read(MASTERS / f"{chapter}.ipynb")
        assert (NOTEBOOKS / f"{chapter}.ipynb").exists(), f"run `make students`, commit notebooks/{chapter}.ipynb"
        student_text = (NOTEBOOKS / f"{chapter}.ipynb").read_text()
        student = _read(NOTEBOOKS / f"{chapter}.ipynb")
        code = "\n".join(c.source for c in student.cells) + json.dumps(student.metadata)
        for marker in ("# BEGIN SOLUTION", "# END SOLUTION", "# SOLUTION", "# HIDDEN", "# BEGIN TESTS",
                       "# BEGIN TEST CONFIG"):
            assert marker not in student_text, f"{marker!r} left in notebooks/{chapter}.ipynb"
        sol = solution_lines(master)
        assert sol, f"{chapter}: the master has no solution lines (is it in otter format?)"
        student_lines = {ln.strip() for ln in code.splitlines()}
        leaked = sorted(sol & student_lines)
        assert not leaked, f"solution lines in notebooks/{chapter}.ipynb: {leaked}"
        hidden = hidden_test_lines(master)
        leaked = sorted(hidden & student_lines)
        assert not leaked, f"hidden tests in notebooks/{chapter}.ipynb: {leaked}"

    def test_untouched_student_notebook_runs_and_scores_zero(self, course_tmp):
        chapter = self.chapter
        ag = assigned(chapter, course_tmp).autograder
        g = grade_one(NOTEBOOKS / f"{chapter}.ipynb", ag, chapter, timeout=900)
        assert g.status == "ok", f"notebooks/{chapter}.ipynb: {g.status}\n{g.report[-3000:]}"
        assert g.possible and all(p > 0 for p in g.possible.values())
        assert g.scores == {q: 0 for q in g.possible}, f"unsolved exercises scored: {g.scores}"


for _master in MASTER_FILES:
    _name = f"TestChapter_{_master.stem}"
    globals()[_name] = type(_name, (ChapterTests,), {"chapter": _master.stem})


def test_solution_and_hidden_line_extraction_on_the_grader_fixture():
    master = _read(Path(__file__).parent / "data" / "grading" / "99_grader_fixture.ipynb")
    assert solution_lines(master) == {"return x * x", "return sum(xs) / len(xs)"}
    assert hidden_test_lines(master) == {"assert square(-4) == 16", "assert mean([5]) == 5"}


def test_the_template_is_skipped_by_the_tooling_and_is_in_otter_format():
    template = MASTERS / "_template.ipynb"
    assert template.exists() and template not in MASTER_FILES
    nb = _read(template)
    assert nb.cells[0].cell_type == "raw" and nb.cells[0].source.startswith("# ASSIGNMENT CONFIG")
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert solution_lines(nb) and hidden_test_lines(nb)
