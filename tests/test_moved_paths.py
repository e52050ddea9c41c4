"""The instruments live in kvlab.costs and kvlab.lab (docs/architecture.md section 5) and the quantized
cache in kvlab.cache.quantized; their old top-level paths, and kvlab.quant.paged, no longer import."""
import importlib

import pytest

import kvlab

MOVED = {f"kvlab.{name}": f"kvlab.costs.{name}"
         for name in ("flops", "forward_cost", "memory", "roofline", "machine", "fit")}
MOVED |= {f"kvlab.{name}": f"kvlab.lab.{name}"
          for name in ("attention_math", "watch", "claims", "fragmentation", "batching", "traces")}
MOVED["kvlab.quant.paged"] = "kvlab.cache.quantized"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_gone_new_path_imports(old):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)
    importlib.import_module(MOVED[old])


def test_old_forms_of_import_are_gone():
    import kvlab.costs.memory
    from kvlab.costs import flops, memory
    from kvlab.lab import traces
    assert memory is kvlab.costs.memory and flops.__name__ == "kvlab.costs.flops"
    assert traces is importlib.import_module("kvlab.lab.traces")
    with pytest.raises(ImportError):
        exec("from kvlab import flops", {})
    with pytest.raises(AttributeError):
        kvlab.no_such_module  # noqa: B018


def test_no_old_path_left_in_the_tree():
    """No source, notebook or document names an old path (this file's MOVED table aside)."""
    import pathlib
    import re
    root = pathlib.Path(kvlab.__file__).parent.parent
    names = "|".join(re.escape(m.removeprefix("kvlab.")) for m in MOVED)
    pat = re.compile(rf"\bkvlab\.({names})\b|\bfrom kvlab import [^\n]*\b({names})\b")
    files = [*(root / "kvlab").rglob("*.py"), *(root / "tests").rglob("*.py"),
             *(root / "benchmarks").rglob("*.py"), *(root / "notebooks").glob("*.ipynb"),
             *(root / "notebooks" / "masters").glob("*.ipynb"), root / "README.md"]
    here = pathlib.Path(__file__).resolve()
    bad = [f"{f.relative_to(root)}: {m.group(0)}" for f in files if f.exists() and f.resolve() != here
           for m in pat.finditer(f.read_text())]
    assert not bad, bad


def test_the_engine_imports_no_instrument():
    """kvlab.engine, cache, model, attention, kernels and quant never import kvlab.costs or kvlab.lab."""
    import pathlib
    root = pathlib.Path(kvlab.__file__).parent
    for pkg in ("engine", "cache", "model", "attention", "kernels", "quant"):
        for f in (root / pkg).rglob("*.py"):
            src = f.read_text()
            for line in src.splitlines():
                if line.lstrip().startswith(("import ", "from ")):
                    assert "kvlab.costs" not in line and "kvlab.lab" not in line, f"{f}: {line}"
