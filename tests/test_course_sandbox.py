"""The fresh-interpreter grader's rules (kvlab.course.sandbox), on a tiny in-memory chapter."""
import math

import pytest
import torch

from kvlab.course.sandbox import Rejected, definitions, run_variant

SPEC = {
    "chapter": "99_tiny",
    "imports": ["import math", "import torch"],
    "questions": [
        {"name": "q1_norm", "points": 2.0, "difficulty": 1, "minutes": 5, "forbid": ["torch.linalg.norm"],
         "names": ["norm"], "solution": "def norm(x):\n    return math.sqrt(float((x * x).sum()))\n",
         "public": ["assert abs(norm(torch.tensor([3.0, 4.0])) - 5.0) < 1e-9"],
         "hidden": ["_x = torch.arange(5.0)\nassert torch.allclose(torch.tensor(norm(_x)), torch.linalg.norm(_x))"]},
        {"name": "q2_double", "points": 1.0, "difficulty": 1, "minutes": 5, "forbid": [],
         "names": ["double"], "solution": "def double(x):\n    return 2 * x\n",
         "public": ["assert double(2) == 4"], "hidden": ["assert double(-3) == -6"]},
    ],
}
MASTER = {q["name"]: q["solution"] for q in SPEC["questions"]}


def _scores(sources, **kw):
    return {q: r["score"] for q, r in run_variant(SPEC, sources, **kw).items()}


def test_the_master_scores_full_marks_and_a_stub_zero():
    assert _scores(MASTER) == {"q1_norm": 2.0, "q2_double": 1.0}
    stubs = {"q1_norm": "def norm(x):\n    ...\n", "q2_double": "def double(x):\n    ...\n"}
    assert _scores(stubs) == {"q1_norm": 0.0, "q2_double": 0.0}


def test_top_level_statements_are_not_run():
    tamper = "torch.allclose = lambda *a, **k: True\nraise SystemExit\n" + MASTER["q1_norm"]
    assert _scores(dict(MASTER, q1_norm=tamper))["q1_norm"] == 2.0   # the answer still counts
    assert torch.allclose is not None and torch.allclose(torch.ones(1), torch.ones(1))


def test_patching_inside_an_answer_scores_zero_and_is_undone():
    real = torch.allclose
    src = "def norm(x):\n    torch.allclose = lambda *a, **k: True\n    return 0.0\n"
    res = run_variant(SPEC, dict(MASTER, q1_norm=src))
    assert res["q1_norm"]["score"] == 0
    assert torch.allclose is real
    assert res["q2_double"]["score"] == 1.0


def test_a_forbidden_call_from_the_answer_fails_but_the_test_may_call_it():
    src = "def norm(x):\n    return float(torch.linalg.norm(x))\n"
    res = run_variant(SPEC, dict(MASTER, q1_norm=src))["q1_norm"]
    assert res["score"] == 0 and "torch.linalg.norm" in res["messages"][0]


def test_only_runs_the_named_questions():
    assert set(run_variant(SPEC, MASTER, only=["q2_double"])) == {"q2_double"}


@pytest.mark.parametrize("src, why", [
    ("import os\ndef f():\n    pass\n", "import of 'os'"),
    ("def f():\n    return eval('1')\n", "'eval'"),
    ("def f():\n    return getattr(math, 'pi')\n", "'getattr'"),
    ("def f(x=print('hi')):\n    pass\n", "default values"),
    ("@print\ndef f():\n    pass\n", "decorator"),
    ("class A(int):\n    def __eq__(self, o):\n        return True\n", "__eq__"),
    ("class A:\n    x = print('hi')\n", "class attributes"),
    ("def f(e):\n    return e.__traceback__.tb_frame\n", "attribute"),
    ("from torch import _C\n", "not allowed"),
    ("import kvlab.course.guard\n", "not allowed"),
])
def test_constructs_that_reach_outside_the_answer_are_refused(src, why):
    with pytest.raises(Rejected, match=why):
        definitions(src)


def test_definitions_keep_imports_functions_and_classes_only():
    kept = definitions("import math\nx = 1\nprint(x)\ndef f():\n    return 1\n@dataclass\nclass C:\n    a: int = 0\n")
    assert [type(n).__name__ for n in kept.body] == ["Import", "FunctionDef", "ClassDef"]
    assert math.isfinite(1.0)


def test_both_otter_hidden_test_formats_are_hidden():
    """`# HIDDEN` and otter's test config with `hidden: true` (chapters 06-11 use it) are both hidden
    tests for the grader and the leak checks; the config block is not a test line."""
    from kvlab.course.questions import cell_test_lines, is_hidden_test

    config = '""" # BEGIN TEST CONFIG\nhidden: true\n""" # END TEST CONFIG\nassert f(3) == 9'
    assert is_hidden_test("# HIDDEN\nassert f(3) == 9") and is_hidden_test(config)
    assert not is_hidden_test(config.replace("true", "false")) and not is_hidden_test("assert f(2) == 4")
    assert cell_test_lines(config) == ["assert f(3) == 9"] == cell_test_lines("# HIDDEN\nassert f(3) == 9")
