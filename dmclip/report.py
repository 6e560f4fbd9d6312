"""What run directories show a person: markdown tables, percentages, figures as PNG.

    markdown_table(["model", "acc@1 (%)"], [["teacher", percent(0.4995)]], align="lr")
    save_figure(fig, run.path / "summary.png")     # or figure_png(fig) for the bytes

One home for each, so every report.md and summary.md in the package reads the same.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A markdown table, one line per row, ending in a newline; cells are written with ``str``.

    ``align`` has a letter per column, ``l`` (left) or ``r`` (right, for numbers); columns past its end are left.
    """
    rules = ["---:" if letter == "r" else "---" for letter in align.ljust(len(header), "l")]
    lines = ["| " + " | ".join(str(cell) for cell in header) + " |", "|" + "|".join(rules) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def percent(value, digits: int = 2, suffix: str = "") -> str:
    """A fraction as a percentage with ``digits`` decimals (``0.4995`` -> ``49.95``); ``-`` for None or NaN."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    return f"{100 * value:.{digits}f}{suffix}"


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: figures are written to files, never shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int | None = None) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **({"dpi": dpi} if dpi else {}))
    plt.close(fig)
    return buffer.getvalue()


def save_figure(fig, path: str | Path, dpi: int | None = None) -> Path:
    """Write the figure to ``path`` as a PNG, atomically (a reader never sees half a file); the figure is closed."""
    from dmclip.io import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, figure_png(fig, dpi))
    return path
