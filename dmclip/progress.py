"""The library's one progress bar: Rich, on stderr (results go to stdout), gone when done; a no-op when off."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(enabled: bool, description: str, total: int, *, completed: int = 0,
                 unit: str = "") -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``. With ``unit`` (e.g. ``"images"``) the bar also shows the rate and the time left.

        with progress_bar(progress, "encoding images", len(dataset)) as advance:
            for batch in batches:
                ...
                advance(len(batch))
    """
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} {unit}/s" if task.speed else f"- {unit}/s")

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [Rate(), TimeElapsedColumn(), TimeRemainingColumn()] if unit else [TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total, completed=completed)
        yield lambda n: bar.advance(task, n)
