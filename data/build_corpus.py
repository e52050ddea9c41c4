"""Build the evaluation corpus from text that every Python installation ships.

Source: `pydoc_data.topics.topics`, the dict of documentation topics behind `help("topic")`
(the language reference, rendered as plain text). Steps, all deterministic:

1. Take the topics in sorted key order and join their texts with a blank line between them.
2. Normalise line endings to "\\n" and strip trailing spaces on each line.
3. Cut the result into consecutive, non-overlapping windows of exactly `--window-chars` characters
   (default 2000), from character 0; the last, shorter remainder is dropped.
4. Keep the first `--num-windows` windows (default 64) and write them as JSON lines
   `{"index": i, "start": char_offset, "text": ...}` to `data/pydoc_windows.jsonl`.

The topics text differs between Python versions, so the first line of the output records the
Python version and the SHA-256 of the whole joined text; the benchmark prints both.

    python data/build_corpus.py                 # writes data/pydoc_windows.jsonl
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
from pathlib import Path

OUT = Path(__file__).with_name("pydoc_windows.jsonl")


def corpus_text() -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n"))


def windows(text: str, window_chars: int) -> list[dict]:
    return [{"index": i, "start": s, "text": text[s:s + window_chars]}
            for i, s in enumerate(range(0, len(text) - window_chars + 1, window_chars))]


def build(window_chars: int = 2000, num_windows: int = 64, out: Path = OUT) -> Path:
    text = corpus_text()
    ws = windows(text, window_chars)[:num_windows]
    header = {"source": "pydoc_data.topics", "python": platform.python_version(),
              "sha256": hashlib.sha256(text.encode()).hexdigest(), "total_chars": len(text),
              "window_chars": window_chars, "num_windows": len(ws)}
    with open(out, "w") as f:
        f.write(json.dumps(header) + "\n")
        for w in ws:
            f.write(json.dumps(w) + "\n")
    return out


def load(path: Path = OUT) -> tuple[dict, list[str]]:
    """(header, window texts) of a built corpus file."""
    lines = Path(path).read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line)["text"] for line in lines[1:]]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--window-chars", type=int, default=2000)
    p.add_argument("--num-windows", type=int, default=64)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    print(build(a.window_chars, a.num_windows, a.out))
