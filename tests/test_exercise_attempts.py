"""Every graded exercise, proved against attempts kept as data (tests/exercise_attempts/chNN.py).

Each file holds `ATTEMPTS = {"<question>": {"shortcuts": [src, ...], "wrong": [src, ...]}}`, each
src a complete replacement of that question's answer cell. Per chapter, in ONE fresh grading
process (`kvlab.course.sandbox`, what `make grade` runs):
- the master's solutions score full marks;
- the untouched student notebook's stubs score 0 on every question;
- each shortcut and each wrong answer scores 0 on its question (the other answers being the
  master's, so it fails for its own sake);
- a tampering submission (the student notebook with every answer cell patching `torch.allclose`,
  `torch.equal`, the grader and the guard at the top level, and its test cells emptied) scores 0;
and every graded question has an entry with at least 2 wrong answers and at least 1 shortcut.
"""
import importlib.util
from pathlib import Path

import nbformat
import pytest

from kvlab.course.grade import run_sandbox
from kvlab.course.paths import MASTERS, NOTEBOOKS
from kvlab.course.questions import chapter_spec, solution_cells

HERE = Path(__file__).parent / "exercise_attempts"
FILES = sorted(HERE.glob("ch[0-9][0-9].py"))
pytestmark = pytest.mark.slow

TAMPER = """
import torch
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
import kvlab.course.guard as _g
_g.forbid.__enter__ = lambda self: self
grader.check = lambda *a, **k: None
"""


def _load(path: Path) -> dict:
    spec = importlib.util.spec_from_file_location(f"attempts_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ATTEMPTS


def _chapter(path: Path) -> str:
    nn = path.stem[2:]
    (master,) = sorted(MASTERS.glob(f"{nn}_*.ipynb"))
    return master.stem


def _tampered(student) -> dict[str, str]:
    """The student notebook, each answer cell prefixed with TAMPER, the test cells emptied."""
    nb = nbformat.from_dict(student)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if "otter_assign_solution_cell" in cell.metadata.get("tags", []):
            cell.source = TAMPER + "\n" + cell.source
        elif cell.source.lstrip().startswith("grader.check("):
            cell.source = cell.source + "\nassert True"
    return solution_cells(nb)


@pytest.fixture(scope="module", params=FILES, ids=[f.stem for f in FILES])
def graded(request):
    path = request.param
    chapter = _chapter(path)
    attempts = _load(path)
    spec = chapter_spec(MASTERS / f"{chapter}.ipynb")
    master = {q["name"]: q["solution"] for q in spec["questions"]}
    student = nbformat.read(NOTEBOOKS / f"{chapter}.ipynb", as_version=4)
    stubs = solution_cells(student)
    variants = [master, stubs, _tampered(student)]
    labels = ["master", "stubs", "tamper"]
    for q, kinds in attempts.items():
        for kind in ("shortcuts", "wrong"):
            for i, src in enumerate(kinds.get(kind, [])):
                variants.append({"sources": dict(master, **{q: src}), "only": [q]})
                labels.append(f"{q}/{kind}[{i}]")
    results, status = run_sandbox(spec, variants, timeout=1200, test_timeout=120)
    assert results is not None, f"{chapter}: {status}"
    return chapter, spec, attempts, dict(zip(labels, results))


def test_every_question_has_attempts(graded):
    chapter, spec, attempts, _ = graded
    names = {q["name"] for q in spec["questions"]}
    assert set(attempts) <= names, f"{chapter}: attempts for unknown questions {set(attempts) - names}"
    for q in names:
        a = attempts.get(q, {})
        assert len(a.get("wrong", [])) >= 2, f"{chapter}/{q}: needs >= 2 plausible wrong answers"
        assert len(a.get("shortcuts", [])) >= 1, f"{chapter}/{q}: needs >= 1 shortcut"


def test_every_question_is_labelled(graded):
    chapter, spec, _, _ = graded
    for q in spec["questions"]:
        assert q["difficulty"] in (1, 2, 3), f"{chapter}/{q['name']}: difficulty 1-3 in BEGIN QUESTION"
        assert isinstance(q["minutes"], int) and q["minutes"] > 0, f"{chapter}/{q['name']}: minutes"
        assert q["hidden"], f"{chapter}/{q['name']}: no hidden test"


def test_master_scores_full_marks(graded):
    chapter, _, _, res = graded
    bad = {q: r["messages"] for q, r in res["master"].items() if r["score"] != r["possible"]}
    assert not bad, f"{chapter}: the master's solutions fail: {bad}"


def test_stubs_score_zero(graded):
    chapter, _, _, res = graded
    assert {q: r["score"] for q, r in res["stubs"].items() if r["score"]} == {}


def test_tampering_gains_nothing(graded):
    chapter, _, _, res = graded
    assert {q: r["score"] for q, r in res["tamper"].items() if r["score"]} == {}


def test_every_shortcut_and_wrong_answer_scores_zero(graded):
    chapter, _, _, res = graded
    passed = [label for label, r in res.items() if "/" in label
              and r[label.split("/")[0]]["score"] != 0]
    assert not passed, f"{chapter}: these attempts scored: {passed}"
