"""The grader: a folder of submissions graded locally, one process each, never modified.

tests/data/grading/ holds a two-question master (99_grader_fixture: q1 2 points, q2 1 point, each
with a public and a hidden test) and submissions: a correct one, a wrong one (passes q1's public
test only: all or nothing, it scores 0), one with a cell that kills the kernel and one with a cell
that raises (the notebook is not run: only the answers are graded), one that tampers (patches,
a fake-equal result, a redefined grader), a file that is not a notebook, and (in hanging/) one
whose answer never returns.
"""
import csv
import hashlib
import os
import time
from pathlib import Path

import nbformat
import pytest

from kvlab.course import grade
from kvlab.course.assign import run_otter_assign

DATA = Path(__file__).parent / "data" / "grading"
pytestmark = pytest.mark.slow


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["student"]: r for r in csv.DictReader(f)}


def _workers_alive() -> list[str]:
    alive = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "kvlab.course.grade --worker" in cmd and "99_grader_fixture" in cmd:
                alive.append(cmd)
    return alive


@pytest.fixture(scope="module")
def assign_dir(tmp_path_factory):
    """The fixture master's autograder; otter assign also grades the master (it must score 100 %)."""
    d = tmp_path_factory.mktemp("assign")
    run_otter_assign((DATA / "99_grader_fixture.ipynb").resolve(), d / "99_grader_fixture", run_tests=True)
    return d


def test_grades_a_folder_and_reports_every_submission(assign_dir, tmp_path):
    folder = DATA / "submissions"
    before = _hashes(folder)
    grades = grade.grade_folder(folder, tmp_path / "out", assign_dir=assign_dir, timeout=300)
    assert _hashes(folder) == before, "a submission was modified"
    assert [g.student for g in grades] == sorted(p.stem for p in folder.glob("*.ipynb"))

    rows = _rows(tmp_path / "out" / "gradebook.csv")
    assert list(next(iter(rows.values())))[:2] == ["student", "chapter"]
    ok = rows["alice_correct"]
    assert (ok["q1_square"], ok["q2_mean"], ok["total"], ok["possible"], ok["status"]) == (
        "2", "1", "3", "3", "ok")
    wrong = rows["bob_wrong"]  # q1's public test passes, its hidden test fails: all or nothing
    assert (wrong["q1_square"], wrong["q2_mean"], wrong["total"], wrong["status"]) == ("0", "0", "0", "ok")
    crash = rows["carol_crash"]  # os._exit in a cell that is not an answer: never run
    assert (crash["q1_square"], crash["q2_mean"], crash["status"]) == ("2", "0", "ok")
    raises = rows["dave_raises"]
    assert raises["status"] == "ok" and raises["q1_square"] == "2"
    tamper = rows["mallory_tampers"]
    assert (tamper["total"], tamper["status"]) == ("0", "ok")
    bad = rows["erin_not_a_notebook"]
    assert bad["status"].startswith("not a notebook") and bad["total"] == "0"

    for student in rows:
        report = (tmp_path / "out" / "reports" / f"{student}.txt").read_text()
        assert f"student: {student}" in report
    assert "assert square(-4) == 16" in (tmp_path / "out" / "reports" / "bob_wrong.txt").read_text()
    mallory = (tmp_path / "out" / "reports" / "mallory_tampers.txt").read_text()
    assert "__eq__ is not allowed" in mallory and "'builtins' is not allowed" in mallory


def test_a_hanging_submission_is_killed_at_the_timeout(assign_dir, tmp_path):
    folder = DATA / "hanging"
    before = _hashes(folder)
    t0 = time.perf_counter()
    (g,) = grade.grade_folder(folder, tmp_path / "out", assign_dir=assign_dir, timeout=15)
    assert time.perf_counter() - t0 < 15 + 30
    assert g.status == "timeout: still running after 15 s" and g.total == 0
    assert _hashes(folder) == before
    assert _workers_alive() == []
    assert _rows(tmp_path / "out" / "gradebook.csv")["frank_hangs"]["possible"] == "3"


def test_chapter_is_read_from_the_otter_init_cell():
    nb = nbformat.read(DATA / "submissions" / "alice_correct.ipynb", as_version=4)
    assert grade.chapter_of(nb) == "99_grader_fixture"
    assert grade.chapter_of(nbformat.v4.new_notebook()) is None


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert grade.main([str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grade.main([str(tmp_path), "--timeout", "0"])


def test_an_empty_folder_gives_an_empty_gradebook(tmp_path):
    assert grade.grade_folder(tmp_path, tmp_path / "out") == []
    assert (tmp_path / "out" / "gradebook.csv").read_text().startswith("student,chapter,total")


def test_questions_and_points_come_from_the_autograder(assign_dir):
    assert grade.questions_of(assign_dir / "99_grader_fixture" / "autograder.zip") == {
        "q1_square": 2.0, "q2_mean": 1.0}
    assert grade.questions_of(assign_dir / "99_grader_fixture" / "grading.json") == {
        "q1_square": 2.0, "q2_mean": 1.0}
    assert os.path.exists(assign_dir / "99_grader_fixture" / "student" / "99_grader_fixture.ipynb")
