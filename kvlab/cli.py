"""The `kvlab` console script: `kvlab serve ...` (see kvlab/serve/cli.py)."""
from __future__ import annotations

import sys

USAGE = "usage: kvlab serve [MODEL] [options]   (kvlab serve --help for the options)"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    if argv[0] != "serve":
        print(f"kvlab: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    from kvlab.serve.cli import main as serve

    serve(argv[1:])


if __name__ == "__main__":
    main()
