"""The library's one progress bar: Rich, on stderr (results go to stdout), drawn only on a terminal; a no-op
otherwise. Commands use ``progress_bar``; the training loop uses ``ProgressBar`` with its rate and loss line."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


class ProgressBar:
    """A bar on stderr while ``enabled`` and stderr is a terminal; otherwise every method does nothing.

    ``unit`` (e.g. ``"images"``) adds the rate and the time left; ``update(rate=...)`` replaces the measured
    rate with the caller's text. ``detail=True`` adds a line under the bar that ``update(detail=...)`` sets
    (the training loop shows the loss parts there). ``keep=True`` leaves the bar on the screen when it closes.
    """

    def __init__(self, enabled: bool, description: str, total: int, *, completed: int = 0, unit: str = "",
                 detail: bool = False, keep: bool = False):
        self._bar = None
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            return
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
                if task.fields["rate"]:
                    return Text(task.fields["rate"])
                return Text(f"{task.speed:.1f} {unit}/s" if task.speed else f"- {unit}/s")

        class WithDetail(Progress):
            def get_renderables(self):
                yield self.make_tasks_table(self.tasks)
                if detail:
                    for task in self.tasks:
                        yield Text(task.fields["detail"], no_wrap=True, overflow="ellipsis")

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
        columns += [Rate(), TimeElapsedColumn(), TimeRemainingColumn()] if unit else [TimeElapsedColumn()]
        self._bar = WithDetail(*columns, console=console, transient=not keep)
        self._task = self._bar.add_task(description, total=total, completed=completed, rate="", detail="")
        self._bar.start()

    @property
    def shown(self) -> bool:
        """Whether a bar is on the screen (so a caller can skip formatting what nobody sees)."""
        return self._bar is not None

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def update(self, completed: int, *, rate: str = "", detail: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, rate=rate, detail=detail)

    def close(self) -> None:
        """Stop drawing (again: nothing)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def progress_bar(enabled: bool, description: str, total: int, *, completed: int = 0,
                 unit: str = "") -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``. With ``unit`` (e.g. ``"images"``) the bar also shows the rate and the time left.

        with progress_bar(progress, "encoding images", len(dataset)) as advance:
            for batch in batches:
                ...
                advance(len(batch))
    """
    with ProgressBar(enabled, description, total, completed=completed, unit=unit) as bar:
        yield bar.advance
