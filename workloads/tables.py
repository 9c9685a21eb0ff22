"""Plain-text tables, for results shown on both sides (a split model's plan, a pipeline's
stages, status and benchmark tables in cluster/)."""
from __future__ import annotations

__all__ = ["text_table"]


def text_table(head: list[str], body: list[list[str]]) -> list[str]:
    """Lines of a plain-text table: header, rule, rows, columns padded to fit."""
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
