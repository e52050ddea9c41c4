"""The instruments moved to kvlab.costs and kvlab.lab (docs/architecture.md section 5); their old
paths, and kvlab.quant.paged, still import as the very same modules (kvlab/_moved.py) until the
exercises move."""
import importlib

import pytest

import kvlab
from kvlab._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module(old):
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_old_forms_of_import():
    from kvlab.flops import forward_flops
    from kvlab.quant.paged import QuantizedPagedKVCache

    import kvlab.costs.flops
    import kvlab.costs.memory
    from kvlab import memory
    from kvlab.cache.quantized import QuantizedPagedKVCache as Q
    assert memory is kvlab.costs.memory and forward_flops is kvlab.costs.flops.forward_flops
    assert QuantizedPagedKVCache is Q and kvlab.traces is importlib.import_module("kvlab.lab.traces")
    with pytest.raises(AttributeError):
        kvlab.no_such_module  # noqa: B018


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
