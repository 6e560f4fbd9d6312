"""The training progress bar (rank 0, a terminal): step, time left, throughput, lr and the loss parts."""

from __future__ import annotations


class Progress:
    """Rich progress on stderr (rank 0, a terminal, ``progress=True``); otherwise nothing.

    Two lines: ``step 12/40 ━━━━  0:00:31 1,883 samples/s lr 1.8e-05`` and the loss parts under it.
    """

    def __init__(self, enabled: bool, total: int, completed: int):
        self.bar = None
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.text import Text

        class TwoLines(Progress):
            def get_renderables(self):
                yield self.make_tasks_table(self.tasks)
                for task in self.tasks:
                    yield Text(task.fields.get("info", ""), no_wrap=True, overflow="ellipsis")

        self.bar = TwoLines(TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=20), TimeRemainingColumn(),
                            TextColumn("{task.fields[speed]}"), console=console, transient=False)
        self.task = self.bar.add_task("train", total=total, completed=completed, info="", speed="")
        self.bar.start()

    def update(self, step: int, values: dict[str, float], lr: float, samples_per_s: float) -> None:
        if self.bar is None:
            return
        parts = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        self.bar.update(self.task, completed=step, info=parts, speed=f"{samples_per_s:,.0f} samples/s  lr {lr:.3g}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
