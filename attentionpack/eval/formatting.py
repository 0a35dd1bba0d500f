"""How report.md, index.html and the command's output write numbers: one format per kind of number."""

from __future__ import annotations

MIB = 1024 * 1024

FORMATS = {  # kind -> (scale, format)
    "mib": (1 / MIB, "{:.1f}"),
    "x": (1, "{:.2f}x"),
    "pct": (1, "{:+.1f}%"),
    "pct2": (1, "{:+.2f}%"),
    "ppl": (1, "{:.2f}"),
    "share": (100, "{:.1f}%"),
    "kl": (1, "{:.4f}"),
    "ms": (1, "{:.1f}"),
    "s": (1, "{:.2f}"),
    "ratio": (1, "{:.2f}"),
}


def fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind not in FORMATS:
        return str(value)
    scale, form = FORMATS[kind]
    return form.format(value * scale)


def md_table(header: list[str], body: list[list[str]]) -> str:
    """A Markdown table of strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
