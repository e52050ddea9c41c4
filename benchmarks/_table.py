"""The markdown table every benchmark prints and writes into its results file."""


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    """One row per dict, the given columns; floats to 4 significant digits."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])
                                       for c in cols) + " |")
    return "\n".join(lines)
