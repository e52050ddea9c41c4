"""The instructor release: a student distribution without the masters, and Gradescope archives."""
import json
import shutil
import subprocess
import sys
import zipfile

import nbformat
import pytest

from kvlab.course import release
from kvlab.course.paths import MASTERS, NOTEBOOKS
from kvlab.course.questions import chapter_spec

pytestmark = pytest.mark.slow
CHAPTER = "01_attention"


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return release.write_student(tmp_path_factory.mktemp("release") / "student")


def test_the_student_distribution_has_the_course_and_nothing_of_the_masters(student):
    names = {p.name for p in (student / "notebooks").glob("*.ipynb")}
    assert names == {p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")}
    for f in ("README.md", "pyproject.toml", "kvlab/__init__.py", "kvlab/course/sandbox.py"):
        assert (student / f).exists(), f
    assert not (student / "notebooks" / "masters").exists() and not (student / "tests").exists()
    assert not (student / "docs" / "instructors.md").exists()
    assert release.leaks(student) == []


def test_the_leak_check_finds_a_master_a_hidden_test_and_a_solution(student, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(student, bad)
    shutil.copytree(MASTERS, bad / "notebooks" / "masters")
    found = release.leaks(bad)
    assert "a masters/ folder" in found
    assert any("marker '# HIDDEN'" in f for f in found)
    assert any("hidden test line" in f for f in found) and any("solution line" in f for f in found)
    shutil.rmtree(bad / "notebooks" / "masters")
    spec = chapter_spec(MASTERS / f"{CHAPTER}.ipynb")
    (bad / "docs" / "cheat.md").write_text(spec["questions"][0]["hidden"][0])
    assert any(f.startswith("docs/cheat.md: hidden test line") for f in release.leaks(bad))


def test_an_autograder_archive_grades_in_a_fresh_interpreter(tmp_path):
    """The archive holds otter's files, the spec, kvlab's source and a run_autograder that calls
    kvlab's grader; run that grader the way Gradescope would, on the master's answers."""
    z = release.write_autograder(MASTERS / f"{CHAPTER}.ipynb", tmp_path / f"{CHAPTER}.zip")
    with zipfile.ZipFile(z) as f:
        names = set(f.namelist())
        run = f.read("run_autograder").decode()
        setup = f.read("setup.sh").decode()
        f.extractall(tmp_path / "source")
    assert {"grading.json", "otter_config.json", "setup.sh", "kvlab-src/pyproject.toml",
            "kvlab-src/kvlab/course/sandbox.py"} <= names
    assert any(n.startswith("tests/q1_attention") for n in names)  # otter's OK-format tests too
    assert "kvlab.course.grade --gradescope" in run and "kvlab-src" in setup
    # a submission: the student notebook with the master's answers pasted in
    spec = json.loads((tmp_path / "source" / "grading.json").read_text())
    nb = nbformat.read(NOTEBOOKS / f"{CHAPTER}.ipynb", as_version=4)
    answers = iter(q["solution"] for q in spec["questions"])
    for cell in nb.cells:
        if "otter_assign_solution_cell" in cell.metadata.get("tags", []):
            cell.source = next(answers)
    (tmp_path / "submission").mkdir()
    nbformat.write(nb, tmp_path / "submission" / "mine.ipynb")
    results = tmp_path / "results" / "results.json"
    subprocess.run([sys.executable, "-m", "kvlab.course.grade", "--gradescope", str(tmp_path / "submission"),
                    str(results), str(tmp_path / "source" / "grading.json")], check=True, timeout=900)
    out = json.loads(results.read_text())
    assert out["score"] == sum(q["points"] for q in spec["questions"])
    assert [t["name"] for t in out["tests"]] == [q["name"] for q in spec["questions"]]
    assert all(t["output"] == "passed" for t in out["tests"])
