"""A chapter's graded questions, read from its master (otter format) or found in a submission.

`chapter_spec(master)` is what the fresh-interpreter grader (`kvlab.course.sandbox`) needs and
little of the notebook's narrative: per question its points, difficulty (1-3), estimated study
minutes, forbidden targets, the names its solution defines, the master's solution cell, and its
public and hidden test cells; plus the chapter's `imports`, its prelude: the import statements and
the function/class definitions (only those) of the master's code cells outside the questions,
which every answer and every test cell starts from. Tests may use nothing else of the notebook.

The BEGIN QUESTION yaml of a master carries the grading metadata (otter ignores unknown keys):

    # BEGIN QUESTION
    name: q3_stable_softmax
    points: 2
    difficulty: 2          # 1 warm-up, 2 core, 3 stretch
    minutes: 20            # estimated study time
    forbid: [torch.softmax, kvlab.lab.attention_math.stable_softmax]

`solution_cells(notebook)` finds each question's answer in a student's notebook: the code cells
tagged `otter_assign_solution_cell` before its `grader.check("name")` cell (or, untagged, the code
cell just before it).
"""
from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat
import yaml

SOLUTION_TAG = "otter_assign_solution_cell"
_CHECK = re.compile(r"""grader\.check\(\s*["']([A-Za-z0-9_]+)["']\s*\)""")
# Imports the tests never need (plotting, the set-up cell's) are left out of the chapter's test prelude.
_SKIP_IMPORTS = ("matplotlib", "IPython", "otter", "os", "time", "importlib")
# A prompt may state the label itself ("*Difficulty 3/3 · about 40 minutes.*") instead of the yaml.
_PROMPT_LABEL = re.compile(r"difficulty\s*(\d)\s*/\s*3\s*·\s*about\s*(\d+)\s*min", re.IGNORECASE)


@dataclass
class Question:
    name: str
    points: float = 1.0
    difficulty: int | None = None
    minutes: int | None = None
    forbid: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)    # what the solution cell defines
    solution: str = ""                                 # the master's solution cell(s)
    public: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)


_TEST_CONFIG = re.compile(r'^\s*(?:"""|\'\'\')\s*# BEGIN TEST CONFIG\n(.*?)\n\s*(?:"""|\'\'\')\s*# END TEST CONFIG',
                          re.DOTALL)


def is_hidden_test(src: str) -> bool:
    """A master's test cell is hidden when its first line is `# HIDDEN` or when it opens with
    otter's test config block (`\"\"\" # BEGIN TEST CONFIG` ... `hidden: true` ...
    `\"\"\" # END TEST CONFIG`). Both are otter formats; every tool here (the grader, the
    student-notebook and release leak checks) must read them the same way."""
    src = src.strip()
    if src.startswith("# HIDDEN"):
        return True
    m = _TEST_CONFIG.match(src)
    if not m:
        return False
    try:
        conf = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return False
    return isinstance(conf, dict) and bool(conf.get("hidden"))


def cell_test_lines(src: str) -> list[str]:
    """The stripped, non-empty lines of a test cell, without its `# HIDDEN` marker or test config."""
    m = _TEST_CONFIG.match(src.strip())
    body = src.strip()[m.end():] if m else src
    return [ln.strip() for ln in body.splitlines() if ln.strip() and ln.strip() != "# HIDDEN"]


def defined_names(src: str) -> list[str]:
    """Top-level functions and classes a cell defines (in order)."""
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return []
    return [n.name for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def import_lines(src: str) -> list[str]:
    """The top-level import statements of a cell, as source lines (plotting imports left out)."""
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return []
    out = []
    for n in tree.body:
        if isinstance(n, ast.Import):
            mods = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and not n.level:
            mods = [n.module or ""]
        else:
            continue
        if any(m.split(".")[0] in _SKIP_IMPORTS for m in mods):
            continue
        out.append(ast.unparse(n))
    return out


def definition_sources(src: str) -> list[str]:
    """The top-level function and class definitions of a (narrative) cell, as source."""
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return []
    lines = src.splitlines()
    return ["\n".join(lines[min([n.lineno] + [d.lineno for d in n.decorator_list]) - 1:n.end_lineno])
            for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def parse_master(master) -> tuple[list[Question], list[str]]:
    """(questions, prelude) of a master notebook (path or nbformat notebook). The prelude is the
    import statements and then the function and class definitions of the master's code cells
    outside the questions (no other statement): the names every answer and test may use."""
    nb = nbformat.read(master, as_version=4) if isinstance(master, (str, Path)) else master
    questions: list[Question] = []
    imports: list[str] = []
    helpers: list[str] = []
    q: Question | None = None
    region = None  # None | "solution" | "tests"
    for cell in nb.cells:
        src = cell.source.strip()
        if cell.cell_type == "raw":
            if src.startswith("# BEGIN QUESTION"):
                conf = yaml.safe_load(src.split("\n", 1)[1]) if "\n" in src else {}
                q = Question(name=conf["name"], points=float(conf.get("points") or 1),
                             difficulty=conf.get("difficulty"), minutes=conf.get("minutes"),
                             forbid=list(conf.get("forbid") or []))
                questions.append(q)
            elif src.startswith("# END QUESTION"):
                q, region = None, None
            elif src.startswith("# BEGIN SOLUTION"):
                region = "solution"
            elif src.startswith("# BEGIN TESTS"):
                region = "tests"
            elif src.startswith(("# END SOLUTION", "# END TESTS")):
                region = None
            continue
        if cell.cell_type == "markdown" and q is not None and region is None and not q.difficulty:
            m = _PROMPT_LABEL.search(cell.source)
            if m:
                q.difficulty, q.minutes = int(m.group(1)), q.minutes or int(m.group(2))
        if cell.cell_type != "code":
            continue
        if q is None:
            if "parameters" not in cell.metadata.get("tags", []):
                imports += [s for s in import_lines(cell.source) if s not in imports]
                helpers += definition_sources(cell.source)
        elif region == "solution":
            q.solution += ("\n\n" if q.solution else "") + cell.source
            q.names += defined_names(cell.source)
        elif region == "tests":
            if is_hidden_test(src):
                q.hidden.append(cell.source)
            else:
                q.public.append(cell.source)
    return questions, imports + helpers


def chapter_spec(master) -> dict:
    """The JSON-able grading spec of a chapter (see the module docstring)."""
    questions, imports = parse_master(master)
    return {"chapter": Path(master).stem if isinstance(master, (str, Path)) else None,
            "imports": imports, "questions": [asdict(q) for q in questions]}


def solution_cells(notebook) -> dict[str, str]:
    """{question: the source of its answer cell(s)} in a student's notebook (see module doc)."""
    out: dict[str, str] = {}
    pending: list[str] = []
    last_code: str | None = None
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        m = _CHECK.search(cell.source)
        if m:
            name = m.group(1)
            if name not in out:
                out[name] = "\n\n".join(pending) if pending else (last_code or "")
            pending, last_code = [], None
            continue
        if SOLUTION_TAG in cell.metadata.get("tags", []):
            pending.append(cell.source)
        last_code = cell.source
    return out


def label(q: Question | dict) -> str:
    """The line shown to the student under a prompt: difficulty, time, what is not allowed."""
    q = q if isinstance(q, dict) else asdict(q)
    parts = []
    if q.get("difficulty"):
        parts.append(f"difficulty {q['difficulty']}/3")
    if q.get("minutes"):
        parts.append(f"about {q['minutes']} min")
    parts.append(f"{q.get('points', 1):g} point{'s' if q.get('points', 1) != 1 else ''}")
    text = "*" + " · ".join(parts) + "*"
    if q.get("forbid"):
        text += " — not allowed here: " + ", ".join(f"`{t}`" for t in q["forbid"])
    return text
