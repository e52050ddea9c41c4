"""Old import paths of modules that moved, kept working for now (`import kvlab.flops` is the
module `kvlab.costs.flops` itself, not a copy, so monkeypatching either name patches both).

Installed by kvlab/__init__.py as a finder on sys.meta_path; it only answers for the names in
MOVED. To be removed once the notebooks and exercises import the new paths (docs/status.md).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {f"kvlab.{name}": f"kvlab.costs.{name}"
         for name in ("flops", "forward_cost", "memory", "roofline", "machine", "fit")}
MOVED |= {f"kvlab.{name}": f"kvlab.lab.{name}"
          for name in ("attention_math", "watch", "claims", "fragmentation", "batching", "traces")}
MOVED["kvlab.quant.paged"] = "kvlab.cache.quantized"


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])     # the module under its new name

    def exec_module(self, module):
        pass                                                  # already executed on import


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
