"""`dmclip runs`: list, show and compare run directories."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dmclip.cli.common import RunsDirOpt, console, largest_unit
from dmclip.errors import DmclipError, did_you_mean
from dmclip.report import markdown_table
from dmclip.report import percent as format_percent

runs_app = typer.Typer(help="List, show and compare run directories.\n\nExample: dmclip runs list --command distill",
                       no_args_is_help=True)

# The metric a person looks at first, per command (first one present wins).
KEY_METRICS = ["zeroshot_acc1", "acc1", "avg_perf", "bleu4", "precision", "loss"]
# The config each command's run directory holds (eval has one per task: none here), for its defaults.
COMMAND_CONFIGS = {"pretrain": ("dmclip.pretrain", "PretrainConfig"), "distill": ("dmclip.distill", "DistillConfig"),
                   "capfilt": ("dmclip.capfilt.config", "CapfiltConfig"),
                   "compress": ("dmclip.compress.pipeline", "CompressConfig")}
ABSENT = "absent"  # the cell of a config key a run does not have (made before the setting existed)


def _flatten(prefix: str, obj, out: dict) -> dict:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj
    return out


def key_metric(run) -> tuple[str, object] | None:
    results = run.results()
    flat = _flatten("", results or {}, {})
    for name in KEY_METRICS:
        for key, value in flat.items():
            if key.split(".")[-1] == name and isinstance(value, (int, float)):
                return name, value
    rows = run.metrics()
    if rows and isinstance(rows[-1].get("loss"), (int, float)):
        return "loss", rows[-1]["loss"]
    return None


def _age(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        then = dt.datetime.fromisoformat(iso)
    except ValueError:
        return "-"
    value, unit = largest_unit((dt.datetime.now().astimezone() - then).total_seconds(),
                               (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)))
    return f"{int(value)}{unit} ago"


def register(app: typer.Typer) -> None:
    @runs_app.command("list")
    def list_runs(
        runs_dir: RunsDirOpt = None,
        command: Annotated[str | None, typer.Option("--command", "-c", help="Only runs of this command.")] = None,
        limit: Annotated[int, typer.Option("--limit", help="Show at most this many (newest first).")] = 30,
    ) -> None:
        """List runs, newest first. Example: dmclip runs list --command pretrain"""
        from dmclip.runs import default_runs_root, find_runs

        root = runs_dir or default_runs_root()
        found = find_runs(root, command)
        if not found:
            console.print(f"no runs under {escape(str(root))} yet — start one with `dmclip pretrain` or `make demo`")
            return
        table = Table(title=f"runs under {root}", title_justify="left")
        for col in ("command", "name", "status", "key metric", "step", "age"):
            table.add_column(col, no_wrap=col != "name")
        table.add_column("directory", overflow="fold")  # wraps instead of hiding the path to copy
        for run in found[:limit]:
            try:
                info = run.info
            except DmclipError:  # a damaged run.json must not hide every other run
                table.add_row("?", "?", Text("damaged", style="red"), "-", "-", "-", str(run.path))
                continue
            status = run.display_status()
            metric = key_metric(run)
            step = run.last_step()
            style = {"completed": "green", "failed": "red", "crashed": "red", "interrupted": "yellow"}.get(status, "")
            # Text cells: names and paths are user text, never Rich markup
            table.add_row(str(info.get("command", "?")), str(info.get("name", "?")), Text(status, style=style),
                          f"{metric[0]}={metric[1]:.4g}" if metric else "-", "-" if step is None else str(step),
                          _age(info.get("start_time")), str(run.path))
        console.print(table)

    @runs_app.command("show")
    def show(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
        """Show one run: provenance, status, results. Example: dmclip runs show runs/distill/<run>"""
        from dmclip.runs import RunDir

        run = RunDir.open(run_dir)
        info = run.info
        table = Table(show_header=False, title=str(run.path), title_justify="left")
        table.add_column("key")
        table.add_column("value")
        for key in ("command", "name", "status", "start_time", "end_time", "seed", "git_sha", "torch", "error"):
            value = run.display_status() if key == "status" else info.get(key)
            table.add_row(key, Text("-" if value is None else str(value)))
        step = run.last_step()
        table.add_row("last step", "-" if step is None else str(step))
        console.print(table)
        results = run.results()
        if results:
            flat = _flatten("", results, {})
            res = Table(title="results.json", title_justify="left")
            res.add_column("metric")
            res.add_column("value", justify="right")
            for key, value in flat.items():
                res.add_row(key, f"{value:.4f}" if isinstance(value, float) else json.dumps(value))
            console.print(res)

    @runs_app.command("compare")
    def compare(run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run directories.")]) -> None:
        """Metrics side by side and the config keys that differ. Example: dmclip runs compare runs/distill/a runs/distill/b"""
        from dmclip.runs import RunDir

        if len(run_dirs) < 2:
            raise DmclipError("compare needs at least two run directories", "pass two or more paths")
        runs = [RunDir.open(p) for p in run_dirs]
        names = [r.path.name for r in runs]
        results = [_flatten("", r.results() or {}, {}) for r in runs]
        keys = list(dict.fromkeys(k for res in results for k, v in res.items() if isinstance(v, (int, float))))
        table = Table(title="metrics", title_justify="left")
        table.add_column("metric")
        for n in names:
            table.add_column(n, justify="right")
        for key in keys:
            table.add_row(key, *[f"{res[key]:.4f}" if isinstance(res.get(key), float) else str(res.get(key, "-")) for res in results])
        console.print(table)
        configs = _flat_configs(runs)
        diff = _differing_keys(configs, _defaults(runs))
        cfg_table = Table(title="config keys that differ", title_justify="left")
        cfg_table.add_column("key")
        for n in names:
            cfg_table.add_column(n)
        for key in diff:
            cfg_table.add_row(key, *[str(c[key]) if key in c else ABSENT for c in configs])
        console.print(cfg_table if diff else "config: identical")

    @runs_app.command("report")
    def report(
        run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (or sweep directories).")],
        metrics: Annotated[str, typer.Option(
            "--metrics", help="Comma list of result keys (dotted) to show.")] = "zeroshot.acc1,zeroshot.acc5",
        format_: Annotated[str, typer.Option("--format", help="md or csv.")] = "md",
        percent: Annotated[bool, typer.Option("--percent/--fractions",
                                              help="Show fractions in [0, 1] as percent.")] = True,
    ) -> None:
        """A table for docs, rendered from run directories: one row per run, the config keys that differ
        between the runs, the chosen result keys, and a footer naming this command, the date, machine and
        seeds. A sweep directory prints its summary.md (itself rendered from its runs).

        Example: dmclip runs report runs/pretrain/a runs/pretrain/b --metrics zeroshot.acc1,train.samples_per_s
        """
        console.print(render_report(run_dirs, metrics.split(","), format_, percent), markup=False,
                      highlight=False, soft_wrap=True)

    app.add_typer(runs_app, name="runs")


def _flat_configs(runs) -> list[dict]:
    """Each run's resolved.yaml as a flat {dotted key: value} dict ({} where it has none)."""
    from dmclip.recipe import parse_yaml

    configs = []
    for r in runs:
        path = r.path / "resolved.yaml"
        data = parse_yaml(path.read_text(encoding="utf-8"), where=str(path)) if path.exists() else {}
        configs.append(_flatten("", data if isinstance(data, dict) else {}, {}))
    return configs


def _defaults(runs) -> list[dict]:
    """Each run's command's config defaults, flat ({} where the command has no one config)."""
    import importlib

    from dmclip.config import to_dict

    flat = {}
    for command in {r.command for r in runs} & set(COMMAND_CONFIGS):
        module, name = COMMAND_CONFIGS[command]
        flat[command] = _flatten("", to_dict(getattr(importlib.import_module(module), name)()), {})
    return [flat.get(r.command, {}) for r in runs]


def _unset(value, default) -> bool:
    """Whether a config value says no more than leaving the key out would: empty, or the key's default."""
    return value is None or (isinstance(value, (str, list, dict)) and not value) or value == default


def _differing_keys(configs: list[dict], defaults: list[dict], ignored: tuple[str, ...] = ()) -> list[str]:
    """The keys whose value is not the same in every config, in first-seen order.

    A key some configs lack (runs made before it existed) differs only where a config that has it sets it:
    ``report_to: []`` or a default beside a run without the key is the same run.
    """
    missing = object()
    differ = []
    for key in dict.fromkeys(k for c in configs for k in c):
        values = {json.dumps(c[key], default=str) for c in configs if key in c}
        lacking = any(key not in c for c in configs)
        if key not in ignored and (len(values) > 1 or lacking and not all(
                _unset(c[key], d.get(key, missing)) for c, d in zip(configs, defaults) if key in c)):
            differ.append(key)
    return differ


def render_report(run_dirs: list[Path], metrics: list[str], format_: str = "md", percent: bool = True) -> str:
    """The `dmclip runs report` text (see its help)."""
    import csv
    import datetime as dt
    import io
    import platform
    import shlex
    import sys

    from dmclip.runs import RunDir

    if format_ not in ("md", "csv"):
        raise DmclipError(f"--format {format_!r} is not md or csv", "use --format md or --format csv")
    if not run_dirs:
        raise DmclipError("no run directories given", "pass one or more run directories")
    sweeps = [p for p in run_dirs if (Path(p) / "summary.md").is_file() and not (Path(p) / "run.json").is_file()]
    if sweeps:
        if len(run_dirs) > 1:
            raise DmclipError("a sweep directory is reported on its own", "pass the sweep directory alone")
        return (Path(sweeps[0]) / "summary.md").read_text()
    runs = [RunDir.open(p) for p in run_dirs]
    configs = _flat_configs(runs)
    differ = _differing_keys(configs, _defaults(runs),
                             ignored=("train.log_every", "train.checkpoint_every", "train.progress"))
    results = [_flatten("", r.results() or {}, {}) for r in runs]
    missing = [m for m in metrics if all(m not in res for res in results)]
    if missing:
        keys = sorted({k for res in results for k, v in res.items() if isinstance(v, (int, float))})
        raise DmclipError(f"no run has the result key {missing[0]!r}", did_you_mean(missing[0], keys))

    def as_percent(key: str) -> bool:  # accuracies and recalls are fractions in [0, 1]
        return percent and key.split(".")[-1].startswith(("acc", "recall", "avg", "r@"))

    def cell(value, key):
        if isinstance(value, float):
            return format_percent(value) if as_percent(key) and 0.0 <= value <= 1.0 else f"{value:.4g}"
        return "-" if value is None else str(value)

    header = ["run", *differ, *[m + (" %" if as_percent(m) else "") for m in metrics]]
    rows = [[r.path.name, *[cell(c[k], k) if k in c else ABSENT for k in differ], *[cell(res.get(m), m) for m in metrics]]
            for r, c, res in zip(runs, configs, results)]
    seeds = sorted({str(c.get("seed")) for c in configs})
    command = "dmclip " + " ".join(shlex.quote(_under_runs_root(a, runs)) for a in sys.argv[1:]) \
        if sys.argv[1:2] == ["runs"] else "dmclip runs report " + " ".join(_under_runs_root(p, runs) for p in run_dirs)
    hosts = sorted({str(r.info.get("host")) for r in runs})
    footer = (f"Rendered by `{command}` on {dt.date.today().isoformat()} from {len(runs)} run(s); seeds: "
              f"{', '.join(seeds)}; runs made on {', '.join(hosts)} ({platform.machine()}), torch "
              f"{', '.join(sorted({str(r.info.get('torch')) for r in runs}))}.")
    if format_ == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buffer.getvalue()
    table = markdown_table(header, rows, align="l" * (1 + len(differ)) + "r" * len(metrics))
    return table + "\n" + footer + "\n"


def _under_runs_root(argument, runs) -> str:
    """A run directory named on the command line as its path under the runs root (``pretrain/<run>``), so
    that a table pasted into docs names no directory of the machine that rendered it; other words as given."""
    for run in runs:
        if Path(argument).resolve() == run.path.resolve():
            parts = run.path.resolve().parts
            top = max((i for i, part in enumerate(parts[:-1]) if part == run.command), default=len(parts) - 1)
            return "/".join(parts[top:])
    return str(argument)
