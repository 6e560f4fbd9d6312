"""What run directories show a person: markdown tables, percentages, figures as PNG.

    markdown_table(["model", "acc@1 (%)"], [["teacher", percent(0.4995)]], align="lr")
    markdown_table(["model", metric_label("acc@1")], [["teacher", format_metric("acc@1", 0.4995)]])
    save_figure(fig, run.path / "summary.png")     # or figure_png(fig) for the bytes

One home for each, so every report.md and summary.md in the package reads the same. One unit per quantity:
files for machines (results.json, metrics.jsonl, CSV) hold fractions in [0, 1]; every table a person reads
shows them in percent, with the unit in its header (``metric_label``); ``metric_unit`` knows which keys.
"""

from __future__ import annotations

import io
import math
import re
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


# Result keys and table labels whose values are fractions in [0, 1] (accuracies, recalls, caption scores,
# shares), matched on how the last dotted part ends once case, spaces and punctuation are removed:
# "zeroshot.acc1", "acc@1", "mean per-class recall", "image_retrieval_recall@5", "world-a T→I R@1",
# "Avg Perf", "BLEU-4", "bleu4_ratio".
_FRACTION = re.compile(r"(acc\d+|acc@\d+|r@\d+|recall(@\d+)?|precision|f1|accuracy|avgperf|bleu\d|meteor|rougel"
                       r"|communicationefficiency|noisyfraction(before|after)|(bleu\d|cider|meteor|rougel)ratio)$")
# CIDEr-D lies in [0, 10]: tables show it x100 like the other caption scores (the COCO papers' convention),
# which is not a percentage.
_CIDER = re.compile(r"cider(d)?$")


def _normalized(key: str) -> str:
    return re.sub(r"[^a-z0-9@]", "", str(key).rsplit(".", 1)[-1].lower())


def metric_unit(key: str) -> str:
    """The unit a table shows the result ``key`` (or a column label) in: ``"%"`` for fractions in [0, 1],
    ``"×100"`` for CIDEr, ``""`` for everything else (losses, ranks, times, counts). A label that already
    names its unit (``"acc@1 %"``) holds a scaled value: ``""``."""
    if "%" in str(key) or "×" in str(key):
        return ""
    name = _normalized(key)
    return "%" if _FRACTION.search(name) else "×100" if _CIDER.search(name) else ""


def metric_label(key: str, label: str | None = None) -> str:
    """A column header: ``label`` (default ``key``) with the unit of ``key`` after it (``"acc@1 %"``)."""
    text = str(key if label is None else label)
    unit = metric_unit(key)
    return f"{text} {unit}" if unit else text


def format_metric(key: str, value, digits: int = 2, other: str = "{:.4g}") -> str:
    """``value`` of the result ``key`` as a table cell in the unit of :func:`metric_unit`: fractions in
    percent with ``digits`` decimals (``0.4995`` -> ``"49.95"``), CIDEr x100 alike; other floats with
    ``other``; ``-`` for None and NaN."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if metric_unit(key):
        return percent(value, digits)
    return other.format(value) if isinstance(value, float) else str(value)


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
