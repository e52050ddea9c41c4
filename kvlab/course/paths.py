"""Where the course lives: the repository root and the notebook folders."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
MASTERS = NOTEBOOKS / "masters"
BUILD = ROOT / "build"

# A chapter notebook is named NN_name.ipynb; anything else (the template, scratch files) is skipped.
CHAPTER = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")


def is_chapter(path: Path) -> bool:
    return bool(CHAPTER.match(Path(path).name))


def chapters(folder: Path) -> list[Path]:
    """The chapter notebooks in `folder`, in course order."""
    return sorted(p for p in Path(folder).glob("*.ipynb") if is_chapter(p))

# Chapters that need an optional package. Triton has no macOS wheels: there, `make course` and
# `make test` skip these chapters with a message instead of failing.
REQUIRES = {"10_triton_kernels": ("triton",)}


def missing_requirements(path: Path) -> list[str]:
    """The packages chapter `path` needs that cannot be imported here (empty: it can run)."""
    import importlib.util

    return [m for m in REQUIRES.get(Path(path).stem, ()) if importlib.util.find_spec(m) is None]
