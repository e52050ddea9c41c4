"""Execute every student notebook with its default parameters (`make course`).

Each notebook runs with papermill in a fresh kernel, from the `notebooks/` folder, and the executed copy
is written to `build/course/`. Figures go to `figures/` through `kvlab.plots.savefig`. The run stops at
the first notebook that fails and names it, the cell, and where the executed copy with the traceback is.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvlab.course.paths import BUILD, NOTEBOOKS, chapters, missing_requirements


def run(notebooks: list[Path], out_dir: Path, kernel: str = "python3") -> int:
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    for i, nb in enumerate(notebooks, 1):
        nb = Path(nb).resolve()
        out = out_dir / nb.name
        print(f"[{i}/{len(notebooks)}] {nb.name} ...", end=" ", flush=True)
        if missing := missing_requirements(nb):
            print(f"skipped: needs {', '.join(missing)} (not installable on this platform)")
            continue
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(out), kernel_name=kernel, cwd=str(nb.parent),
                                progress_bar=False)
        except pm.PapermillExecutionError as e:
            print(f"FAILED after {time.perf_counter() - t0:.1f} s")
            print(f"\nmake course: {nb.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}",
                  file=sys.stderr)
            print(f"The executed notebook with the full traceback is {out}", file=sys.stderr)
            return 1
        except Exception as e:  # kernel died, timeout, unreadable notebook
            print(f"FAILED after {time.perf_counter() - t0:.1f} s")
            print(f"\nmake course: {nb.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"ok in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"{len(notebooks)} notebooks in {time.perf_counter() - total:.1f} s; executed copies in {out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/NN_name.ipynb")
    ap.add_argument("--out", type=Path, default=BUILD / "course")
    ap.add_argument("--kernel", default="python3")
    args = ap.parse_args(argv)
    notebooks = args.notebooks or chapters(NOTEBOOKS)
    if not notebooks:
        print("make course: no notebooks/NN_name.ipynb found; nothing to run")
        return 0
    return run(notebooks, args.out, args.kernel)


if __name__ == "__main__":
    sys.exit(main())
