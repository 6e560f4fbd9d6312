"""Shared option types and helpers of the command modules; a command runs through :func:`dmclip.runner.launch`."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import inspect
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()  # results: stdout
err_console = Console(stderr=True)
CURRENT_ARGV: list[str] | None = None  # set by main(); what run.json records as argv

RecipeArg = Annotated[Path | None, typer.Argument(
    help="YAML recipe, or a run's resolved.yaml to repeat it exactly.", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override any config field: key.path=value (repeatable).", show_default=False)]
NameOpt = Annotated[str | None, typer.Option("--name", "-n", help="Run name (part of the run directory name).")]
RunsDirOpt = Annotated[Path | None, typer.Option(
    "--runs-dir", help="Where run directories go (default: $DMCLIP_RUNS or ./runs).", show_default=False)]
ResumeOpt = Annotated[Path | None, typer.Option(
    "--resume", help="Continue an interrupted run directory (same results as an uninterrupted run).",
    show_default=False)]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (overrides the recipe's).")]
ReportToOpt = Annotated[str | None, typer.Option(
    "--report-to", help="Also write every metrics row and the results to tensorboard, wandb (offline) or "
                        "tensorboard,wandb, inside the run directory (needs pip install -e '.\\[dashboards]').",
    show_default=False)]


class SharedOptions:
    """Options that several commands take, declared once as the ``Annotated`` fields (with defaults) of a
    dataclass that subclasses this. ``@Options.add`` gives a command those options after its own; it gets them
    as one keyword argument, ``options``. Typer sees ordinary options: ``--help`` lists them and each value is
    parsed and checked as if written out in the command's signature.

        @app.command("pretrain")
        @RunOptions.add
        def pretrain(recipe: RecipeArg = None, ..., *, options: RunOptions) -> None: ...
    """

    @classmethod
    def add(cls, command: Callable) -> Callable:
        hints = typing.get_type_hints(cls, include_extras=True)
        shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                    annotation=hints[f.name]) for f in dataclasses.fields(cls)]
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "options"]

        @functools.wraps(command)
        def with_shared(**values):
            options = cls(**{p.name: values.pop(p.name) for p in shared})
            return command(**values, options=options)

        with_shared.__signature__ = signature.replace(parameters=[*own, *shared])  # what Typer reads
        return with_shared


@dataclasses.dataclass
class RunOptions(SharedOptions):
    """The options of every command that makes one run directory (pretrain, distill, capfilt)."""

    seed: SeedOpt = None
    report_to: ReportToOpt = None
    sets: SetOpt = None
    name: NameOpt = None
    runs_dir: RunsDirOpt = None
    resume: ResumeOpt = None

    def shortcuts(self, report_to: str = "train.report_to") -> dict:
        """The config fields --seed and --report-to set (``report_to``: where the dashboards go in the config)."""
        return {"seed": self.seed, report_to: report_to_names(self.report_to)}

    def launch(self, command, *, recipe: Path | None, shortcuts: dict, sweep: dict | None = None):
        """:func:`dmclip.runner.launch` with these options: one run, or a sweep."""
        return launch(command, recipe=recipe, sets=self.sets, shortcuts=shortcuts, sweep=sweep, name=self.name,
                      runs_dir=self.runs_dir, resume=self.resume)


def launch(command, *, runs_dir: Path | None = None, **kwargs):
    """:func:`dmclip.runner.launch` with the command line run.json records."""
    from dmclip.runner import launch as run_command

    return run_command(command, runs_root=runs_dir, argv=CURRENT_ARGV or ["dmclip", *sys.argv[1:]], **kwargs)


def report_to_names(value: str | None) -> list[str] | None:
    """--report-to's value as the config's list (None = not given), its packages checked before any run exists."""
    if value is None:
        return None
    from dmclip.train.report_to import parse, require

    names = parse(value)
    require(names)
    return names


def largest_unit(value: float, units: Sequence[tuple[str, float]]) -> tuple[float, str]:
    """``value`` in the largest of ``units`` (``(name, size)``, largest first) that it reaches, else in the last:
    ``largest_unit(2.5e6, (("MB", 1e6), ("kB", 1e3), ("B", 1)))`` -> ``(2.5, "MB")``."""
    for unit, size in units:
        if value >= size:
            return value / size, unit
    unit, size = units[-1]
    return value / size, unit


def metrics_table(title: str, rows: list[dict], columns: list[str] | None = None, fmt: str = "{:.2f}",
                  percent: bool = False, labels: dict[str, str] | None = None) -> Table:
    """A Rich table of result rows (numbers formatted with ``fmt``, None shown as '-').

    ``percent``: the columns whose name :func:`dmclip.report.metric_unit` knows as fractions in [0, 1]
    (``"acc@1"``, ``"bleu4"``, ``"mean per-class recall"``) hold fractions; they are shown in percent with the
    unit in the header (``"acc@1 %"``), CIDEr x100. Pass fractions, never values already multiplied by 100.
    ``labels``: headers for some columns (``{"bleu4": "BLEU-4"}``); the unit still follows the column's name.
    """
    from dmclip.report import format_metric, metric_label, metric_unit

    table = Table(title=title, title_justify="left")
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    scaled = {col for col in columns if percent and metric_unit(col)}
    labels = labels or {}
    for col in columns:
        header = metric_label(col, labels.get(col)) if col in scaled else labels.get(col, col)
        table.add_column(header, justify="right" if rows and isinstance(rows[0].get(col), (int, float)) else "left")
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col)
            if value is None:
                cells.append("-")
            elif col in scaled:
                cells.append(format_metric(col, value))
            elif isinstance(value, float):
                cells.append(fmt.format(value))
            else:
                cells.append(str(value))
        table.add_row(*cells)
    return table


def eval_cells(result: dict) -> dict:
    """A run's scores (results.json's ``eval``) as table cells in percent: each set's column, then Avg Perf
    when there is more than one."""
    scores = result.get("eval") or {}
    shown = [column for column in scores if column != "Avg Perf" or len(scores) > 2]
    return {f"{column} %": 100 * scores[column] for column in shown}


def age(iso: str | None) -> str:
    """How long ago an ISO time was, in its largest unit ('3d', '5m'); '-' for none."""
    seconds = seconds_since(iso)
    if seconds is None:
        return "-"
    value, unit = largest_unit(seconds, (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)))
    return f"{int(value)}{unit}"


def seconds_since(iso: str | None) -> float | None:
    """Seconds since an ISO time with a zone; None for a missing or unreadable one."""
    try:
        return (dt.datetime.now().astimezone() - dt.datetime.fromisoformat(iso)).total_seconds()
    except (TypeError, ValueError):
        return None
