"""Figures for run directories: one way to turn a matplotlib figure into PNG bytes."""

from __future__ import annotations

import io


def figure_png(fig, dpi: int | None = None) -> bytes:
    """The figure as PNG bytes (write them with ``runs.atomic_write_bytes``); the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **({"dpi": dpi} if dpi else {}))
    plt.close(fig)
    return buffer.getvalue()
