"""What every results file says about its run, and how it is written (benchmarks/results/)."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from kvlab.costs.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]


def run_info(benchmark: str, argv, args, **extra) -> dict:
    """The date, command, machine, load average, git commit and settings of this run, plus `extra`."""
    cmd = f"python benchmarks/{benchmark}.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    return {"benchmark": benchmark, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": cmd.strip(), "machine": machine_info(), "load_average": os.getloadavg(),
            "git_commit": commit,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, **extra}


def write_results(out: Path, info: dict, markdown: str) -> None:
    """out.json (info) and out.md (markdown) side by side."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    out.with_suffix(".md").write_text(markdown)
